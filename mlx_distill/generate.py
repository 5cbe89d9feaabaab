"""Batched MLX generation: continuous batching (``fastdecode`` greedy on the CPU, else mlx-lm's ``BatchGenerator``).

Prompt-lookup decoding is opt-in.

Used for the local/offline teacher, and for the base and distilled students on
the held-out prompts. Greedy by default; ``--lookup-tokens K`` (opt-in) verifies
K prompt-lookup drafts a row per model call (:mod:`mlx_distill.lookup`): the
same answers from fewer calls. Each record holds the text, prompt and completion token counts, the stop
reason (``eos`` or ``length``) and tok/s.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, cli_errors
from mlx_distill.lookup import MIN_SHARED_PREFIX, shared_prefix

__all__ = ["LOOKUP_TOKENS", "MIN_SHARED_PREFIX", "Completion", "GenerateConfig", "chat_tokens", "check_config",
           "cli", "generate_base_and_adapted", "generate_batch", "generate_file", "read_text_arg",
           "shared_prefix_cache"]

LOOKUP_TOKENS = 0  # prompt-lookup drafts a row per call in greedy decoding (``lookup.decode``): opt-in


@dataclass
class GenerateConfig:
    model: str = opt("demo", "Student model: demo, a .gguf file, an mlx-lm directory or a hub id.")
    adapter_path: str | None = opt(None, "Adapter folder to apply (mlx-lm format).")
    prompts: str | None = opt(None, "Prompt JSONL file ({'id', 'prompt', ...} per line).")
    out: str | None = opt(None, "Output JSONL file (one record per prompt).")
    system: str | None = opt(None, "System prompt for every request (TEXT or @file).")
    max_tokens: int = opt(512, "Maximum new tokens per answer.")
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy.")
    top_p: float = opt(1.0, "Nucleus sampling mass (with temperature > 0).")
    seed: int = opt(0, "Random seed for sampling.")
    batch_size: int = opt(8, "Sequences decoded together (continuous batching).")
    lookup_tokens: int = opt(LOOKUP_TOKENS, "Greedy only: prompt-lookup draft tokens verified per row and model "
                             "call (same answers, fewer calls; on a 2-core CPU it runs on MLX's attention, and since the default "
                             "greedy path (fastdecode) it is slower there: 0.64-0.71x); 0: off.")
    dtype_policy: str = opt("auto", "auto: fp32 on CPU, as stored on a GPU.", choices=("auto", "float32", "native"))
    overwrite: bool = opt(False, "Replace an existing --out file.")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str  # "eos" | "length"
    elapsed_s: float
    tok_per_s: float


def read_text_arg(value: str | None) -> str | None:
    """``@path`` reads a file; anything else is the text itself."""
    if value and value.startswith("@"):
        p = Path(value[1:])
        if not p.is_file():
            raise ConfigError(f"{value}: no such file")
        return p.read_text(encoding="utf-8")
    return value


def chat_tokens(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt appended."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def shared_prefix_cache(model: Any, encoded: list[list[int]]) -> tuple[list[int], list[Any] | None]:
    """Prefill the prompts' common prefix once and give each sequence its own copy of the KV cache.

    With a shared system prompt (the demo teacher's ~250-token style prompt), every
    prompt starts with the same tokens; prefilling them once instead of per prompt
    saves (n - 1) x prefix tokens of prompt processing (~200 tok/s on a 2-core CPU).
    Returns ``([], None)`` when there is no useful shared prefix.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    k = shared_prefix(encoded, MIN_SHARED_PREFIX)  # every sequence keeps at least its last token
    if not k:
        return [], None
    first = encoded[0]
    cache = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in cache):
        return [], None  # rotating/quantized caches: keep the simple path
    model(mx.array([first[:k]]), cache=cache)
    kv = [c.keys_and_values() for c in cache]
    mx.eval(kv)
    copies = []
    for _ in encoded:
        layer_copies = []
        for keys, values in kv:
            cc = KVCache()
            # MLX arrays are values: a later in-place update of one copy makes a new array,
            # so the sequences can share the prefilled buffers.
            cc.state = (keys, values, keys.shape[2])
            layer_copies.append(cc)
        copies.append(layer_copies)
    return first[:k], copies


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    on_done: Callable[[int, Completion], None] | None = None,
    lookup_tokens: int = LOOKUP_TOKENS,
) -> list[Completion]:
    """Generate one answer per prompt, ``batch_size`` sequences at a time; results in input order.

    Greedy on the CPU: :mod:`mlx_distill.fastdecode` (continuous batching,
    attention in the BLAS shim's kernel) where it runs the model; otherwise
    mlx-lm's ``BatchGenerator`` (continuous batching); with ``lookup_tokens``
    > 0, greedy (``temperature`` 0) and a model :mod:`mlx_distill.lookup`
    supports, prompt-lookup decoding with that many drafts a row per call
    (``lookup.decode``; the greedy answers from fewer model calls) over
    length-sorted groups of prompts. ``on_done(index,
    completion)`` is called as each sequence finishes (for progress bars and
    incremental writes).
    """
    from mlx_distill import fastdecode, lookup

    if not prompts:
        return []
    with _no_gc():
        if temperature == 0 and lookup_tokens == 0 and fastdecode.supported(model):
            return _generate_fast(model, tokenizer, prompts, system=system, max_tokens=max_tokens,
                                  batch_size=batch_size, on_done=on_done)
        if temperature == 0 and lookup_tokens > 0 and lookup.supported(model):
            return _generate_lookup(model, tokenizer, prompts, system=system, max_tokens=max_tokens,
                                    batch_size=batch_size, k=lookup_tokens, on_done=on_done)
        return _generate_batch(model, tokenizer, prompts, system=system, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                               on_done=on_done)


def _completion(tokenizer: Any, tokens: list[int], prompt_tokens: int, reason: str, t0: float) -> Completion:
    """A finished sequence's record; its time and rate count from ``t0``, the start of the batch."""
    elapsed = time.perf_counter() - t0
    return Completion(text=tokenizer.decode(tokens), prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                      stop_reason=reason, elapsed_s=round(elapsed, 3),
                      tok_per_s=round(len(tokens) / elapsed, 2) if elapsed > 0 else 0.0)


def _generate_fast(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None, max_tokens: int,
    batch_size: int, on_done: Callable[[int, Completion], None] | None,
) -> list[Completion]:
    """``fastdecode.decode`` over all prompts (a freed slot takes the next prompt)."""
    from mlx_distill import fastdecode

    encoded = [chat_tokens(tokenizer, p, system) for p in prompts]
    results: list[Completion | None] = [None] * len(encoded)
    t0 = time.perf_counter()

    def finished(i: int, tokens: list[int], reason: str) -> None:
        results[i] = _completion(tokenizer, tokens, len(encoded[i]), reason, t0)
        if on_done is not None:
            on_done(i, results[i])

    fastdecode.decode(model, encoded, max_tokens=max_tokens, stop=set(tokenizer.eos_token_ids),
                      batch_size=batch_size, on_done=finished)
    return [r for r in results if r is not None]


def _generate_lookup(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None, max_tokens: int,
    batch_size: int, k: int, on_done: Callable[[int, Completion], None] | None,
) -> list[Completion]:
    """``lookup.decode`` over groups of ``batch_size`` prompts (sorted by length; no refill as rows finish)."""
    from mlx_distill import lookup

    encoded = [chat_tokens(tokenizer, p, system) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less left padding per group
    results: list[Completion | None] = [None] * len(encoded)
    t0 = time.perf_counter()
    for start in range(0, len(order), max(1, batch_size)):
        group = order[start:start + max(1, batch_size)]

        def finished(j: int, tokens: list[int], reason: str, calls: int, group: list[int] = group) -> None:
            i = group[j]
            results[i] = _completion(tokenizer, tokens, len(encoded[i]), reason, t0)
            if on_done is not None:
                on_done(i, results[i])

        lookup.decode(model, [encoded[i] for i in group], max_tokens=max_tokens,
                      stop=set(tokenizer.eos_token_ids), k=k, on_done=finished)
    return [r for r in results if r is not None]


@contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cyclic GC off while decoding (restored after).

    BatchGenerator allocates thousands of small Python objects per step, so the
    collector ran every few steps: 4% of a batched decode's CPU time in a perf
    profile (gc_collect_main, visit_decref, visit_reachable). Nothing it
    allocates is cyclic garbage that must go before the loop ends.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None, max_tokens: int,
    temperature: float, top_p: float, seed: int, batch_size: int,
    on_done: Callable[[int, Completion], None] | None,
) -> list[Completion]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    encoded = [chat_tokens(tokenizer, p, system) for p in prompts]
    prefix, caches = shared_prefix_cache(model, encoded)
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert(
            [e[len(prefix):] for e in encoded], [max_tokens] * len(encoded),
            caches=caches, all_tokens=[list(prefix) for _ in encoded] if caches else None,
        )
        index = {uid: i for i, uid in enumerate(uids)}
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        results: list[Completion | None] = [None] * len(uids)
        t0 = time.perf_counter()
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":  # the eos token itself is not part of the text
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    i = index[r.uid]
                    reason = "eos" if r.finish_reason == "stop" else "length"
                    results[i] = _completion(tokenizer, tokens[r.uid], len(encoded[i]), reason, t0)
                    if on_done is not None:
                        on_done(i, results[i])
    finally:
        gen.close()
    return [r for r in results if r is not None]


def _records(prompts: list[Any], completions: list[Completion], model_label: str, cfg: GenerateConfig,
             system: str | None, adapter: str | None) -> list[dict[str, Any]]:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [
        {
            "id": p.id,
            "prompt": p.prompt,
            "system": system,
            "response": c.text,
            "model": model_label,
            "adapter": adapter,
            **{k: v for k, v in asdict(c).items() if k != "text"},
            "temperature": cfg.temperature,
            "seed": cfg.seed,
            "created_at": now,
        }
        for p, c in zip(prompts, completions)
    ]


def check_config(cfg: GenerateConfig) -> None:
    """A ConfigError naming the flag for options no generation can run with."""
    if cfg.lookup_tokens < 0:
        raise ConfigError(f"--lookup-tokens must be 0 (off) or more, got {cfg.lookup_tokens}")
    if cfg.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be 1 or more, got {cfg.max_tokens}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {cfg.batch_size}")


def generate_file(cfg: GenerateConfig, echo: Callable[[str], None] = print) -> Path:
    """``mlx-distill generate``: answer every prompt in ``cfg.prompts`` into ``cfg.out``."""
    from mlx_distill import models
    from mlx_distill.files import write_jsonl_atomic
    from mlx_distill.prompts import load_prompts

    if not cfg.prompts or not cfg.out:
        raise ConfigError("--prompts and --out are required")
    check_config(cfg)
    out = Path(cfg.out)
    if out.exists() and out.stat().st_size > 0 and not cfg.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or choose another path")
    prompts = load_prompts(cfg.prompts)
    system = read_text_arg(cfg.system)
    model, tokenizer, info = models.load(cfg.model, cfg.adapter_path, cfg.dtype_policy)
    done = [0]

    def progress(i: int, c: Completion) -> None:
        done[0] += 1
        echo(f"[{done[0]}/{len(prompts)}] {prompts[i].id}: {c.completion_tokens} tokens ({c.stop_reason})")

    completions = generate_batch(
        model, tokenizer, [p.prompt for p in prompts], system=system, max_tokens=cfg.max_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
        on_done=progress, lookup_tokens=cfg.lookup_tokens,
    )
    write_jsonl_atomic(out, _records(prompts, completions, cfg.model, cfg, system, cfg.adapter_path))
    save_config(cfg, out.with_suffix(".config.json"))
    return out


def generate_base_and_adapted(
    cfg: GenerateConfig, prompts: list[Any], adapter_path: str | Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Base and distilled answers from one loaded base: generate, apply the adapter, generate."""
    from mlx_distill import models

    check_config(cfg)
    system = read_text_arg(cfg.system)
    model, tokenizer, _ = models.load(cfg.model, None, cfg.dtype_policy)
    kw = dict(system=system, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
              top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size, lookup_tokens=cfg.lookup_tokens)
    texts = [p.prompt for p in prompts]
    base = generate_batch(model, tokenizer, texts, **kw)
    models.load_adapter(model, adapter_path)
    adapted = generate_batch(model, tokenizer, texts, **kw)
    return (
        _records(prompts, base, cfg.model, cfg, system, None),
        _records(prompts, adapted, cfg.model, cfg, system, str(adapter_path)),
    )


@click.command("generate")
@click_options(GenerateConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Batched MLX generation: one answer per prompt, written as JSONL."""
    cfg = resolve(GenerateConfig, kwargs, config_file, section="generate")
    out = generate_file(cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(str(out))


if __name__ == "__main__":
    cli()
