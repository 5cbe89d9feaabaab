"""Prove an export is the model that was trained: logits, argmax and greedy text.

Three checks, on a few fixed chat prompts (teacher-forced through a short
assistant answer, so the positions the adapter was trained on are covered):

1. the fused folder, reloaded by MLX, reproduces the adapter-applied MLX model:
   in fp32, max |Δlogit| <= 1e-3 and 100% argmax agreement. This is what
   catches a fuse that erased the adapter (mlx-lm issue #1172: re-quantizing a
   merged weight rounds a small LoRA delta away);
2. when torch and transformers are importable, transformers (torch CPU, fp32)
   reproduces the fused MLX logits under the same bounds, its tokenizer encodes
   the chats to the same ids, and a 32-token greedy continuation is identical;
3. any failure raises :class:`VerificationError` with the numbers (exit 1).

Half-precision exports are checked in fp32 before the cast (bounds above);
after the cast, check 1 becomes "the adapter survived the cast" (see
``check_cast``: bf16 rounding alone moves the demo's logits by up to ~0.4, so
1e-3 cannot hold), while check 2 still compares identical stored weights and
keeps the fp32 bounds. The numbers go to ``DIR/verify.json``; the model card cites them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from mlx_distill.errors import ConfigError, VerificationError, cli_errors
from mlx_distill.verify_torch import hf_load, torch_available, torch_greedy, torch_logits

MAX_ABS_LOGIT_DIFF = 1e-3
ARGMAX_AGREEMENT = 1.0
GREEDY_TOKENS = 32
CAST_MEAN_RATIO = 0.1  # after a half-precision cast: keep >= 90% of the adapter's effect...
CAST_ARGMAX = 0.95  # ...and >= 95% argmax agreement (see check_cast for measured values)

# (user prompt, fixed assistant answer): the answer is teacher-forced, so logits are
# compared on assistant-side positions as well (~40-60 positions per chat).
VERIFY_CHATS: tuple[tuple[str, str], ...] = (
    ("Write a Python function that reverses a string.",
     "def reverse(s: str) -> str:\n    return s[::-1]"),
    ("Explain what a hash map is in one sentence.",
     "A hash map stores key-value pairs and finds a value from its key in constant time."),
    ("Fix the bug: def add(a, b): return a - b",
     "def add(a, b):\n    return a + b  # was a - b"),
)


def chat_ids(tokenizer: Any, with_answer: bool) -> list[list[int]]:
    """Token ids of the verification chats (full chat, or up to the generation prompt)."""
    out = []
    for user, answer in VERIFY_CHATS:
        if not getattr(tokenizer, "chat_template", None):  # a base model without a template
            out.append([int(i) for i in tokenizer.encode(f"{user}\n{answer}" if with_answer else user)])
            continue
        messages = [{"role": "user", "content": user}]
        if with_answer:
            messages.append({"role": "assistant", "content": answer})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=not with_answer, tokenize=True, return_dict=False
        )
        out.append([int(i) for i in ids])
    return out


def mlx_logits(model: Any, ids_list: Sequence[Sequence[int]]) -> list[Any]:
    """fp32 numpy logits (T, V) for each sequence."""
    import mlx.core as mx
    import numpy as np

    out = []
    for ids in ids_list:
        logits = model(mx.array([list(ids)]))[0].astype(mx.float32)
        mx.eval(logits)
        out.append(np.array(logits))
    return out


def adapter_modules(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every LoRA/DoRA wrapper in an adapter-applied MLX model."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse") and hasattr(m, "lora_a")]


def base_logits(model: Any, ids_list: Sequence[Sequence[int]]) -> list[Any] | None:
    """Logits with the adapter wrappers swapped out for their base layers (then restored)."""
    from mlx.utils import tree_unflatten

    wrapped = adapter_modules(model)
    inner = [(n, getattr(m, "linear", None) or getattr(m, "embedding", None)) for n, m in wrapped]
    if not wrapped or any(b is None for _, b in inner):
        return None
    model.update_modules(tree_unflatten(inner))
    try:
        return mlx_logits(model, ids_list)
    finally:
        model.update_modules(tree_unflatten(wrapped))


def compare(a: Sequence[Any], b: Sequence[Any]) -> dict[str, Any]:
    """Max/mean |Δlogit| and argmax agreement over all positions of all sequences."""
    import numpy as np

    max_abs, total_abs, n_vals, agree, positions = 0.0, 0.0, 0, 0, 0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"logit shapes differ: {x.shape} vs {y.shape}")
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        max_abs = max(max_abs, float(d.max()))
        total_abs += float(d.sum())
        n_vals += d.size
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        positions += x.shape[0]
    return {
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": total_abs / max(n_vals, 1),
        "argmax_agreement": agree / max(positions, 1),
        "argmax_agree_positions": agree,
        "positions": positions,
    }


def check_bounds(what: str, cmp: dict[str, Any], fix: str) -> dict[str, Any]:
    """Raise VerificationError with the numbers unless ``cmp`` is within the fp32 bounds."""
    ok = cmp["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF and cmp["argmax_agreement"] >= ARGMAX_AGREEMENT
    cmp["passed"] = ok
    if not ok:
        raise VerificationError(
            f"{what}: max |Δlogit| {cmp['max_abs_logit_diff']:.3g} (bound {MAX_ABS_LOGIT_DIFF:g}), "
            f"argmax agreement {cmp['argmax_agreement']:.2%} "
            f"({cmp['argmax_agree_positions']}/{cmp['positions']} positions; bound 100%).\n  {fix}"
        )
    return cmp


def load_mlx_folder(folder: str | Path) -> tuple[Any, Any]:
    """Load an exported folder with mlx-lm, upcast to fp32 (as a CPU user would run it)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, config = load_model(Path(folder))
    except (ValueError, FileNotFoundError) as e:
        raise VerificationError(f"{folder}: mlx-lm cannot load the export: {e}") from None
    model.set_dtype(mx.float32)
    return model, load_tokenizer(Path(folder), eos_token_ids=config.get("eos_token_id"))


def eos_ids(folder: str | Path) -> set[int]:
    """The stop ids an exported folder declares (generation_config, then config)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        p = Path(folder) / name
        if p.is_file():
            v = json.loads(p.read_text()).get("eos_token_id")
            ids |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
    return ids


def mlx_greedy(model: Any, ids: Sequence[int], n: int, stop: set[int]) -> list[int]:
    """``n`` greedy tokens with a KV cache, stopping after a stop id."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out: list[int] = []
    logits = model(mx.array([list(ids)]), cache=cache)
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1].astype(mx.float32)).item())
        out.append(tok)
        if tok in stop:
            break
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def check_transformers(
    folder: str | Path, mlx_model: Any, base_tok: Any, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Step 2: transformers vs MLX on the same stored weights (both fp32), plus tokenizer and greedy.

    ``base_tok`` is the base model's tokenizer: the export's must encode the chats identically.
    """
    notice = torch_available()
    if notice:
        echo(f"verify: transformers check {notice}")
        return {"skipped": notice}
    import torch
    import transformers
    from transformers import AutoTokenizer

    full, gen = chat_ids(base_tok, True), chat_ids(base_tok, False)
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    if chat_ids(hf_tok, True) != full:
        raise VerificationError(
            f"{folder}: transformers' tokenizer encodes the verification chats differently from "
            "the base model's; tokenizer.json / tokenizer_config.json (chat_template) were not "
            "carried over intact."
        )
    hf = hf_load(folder)
    cmp = compare(torch_logits(hf, full), mlx_logits(mlx_model, full))
    cmp.update(transformers=transformers.__version__, torch=torch.__version__)
    check_bounds("transformers vs fused MLX logits", cmp,
                 "transformers computes a different function from the same weights: check config.json "
                 "(rope, norm eps, tied embeddings) against the MLX model's args.")
    stop = eos_ids(folder)
    for i, ids in enumerate(gen):
        a, b = mlx_greedy(mlx_model, ids, GREEDY_TOKENS, stop), torch_greedy(hf, ids, GREEDY_TOKENS, stop)
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise VerificationError(
                f"greedy continuation of verification chat {i} differs at token {k}: "
                f"MLX {a[k:k + 4]} vs transformers {b[k:k + 4]} (MLX: {a}; transformers: {b})"
            )
        cmp.setdefault("greedy_tokens", []).append(len(a))
    cmp["greedy_identical"] = True
    tokens = ", ".join(str(n) for n in cmp["greedy_tokens"])
    echo(f"verify: transformers vs MLX max |Δlogit| {cmp['max_abs_logit_diff']:.2e}, argmax "
         f"{cmp['argmax_agreement']:.0%}, greedy identical ({tokens} tokens)")
    return cmp


def check_cast(cmp_export: dict[str, Any], cmp_base: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    """After a half-precision cast (or on MLX-quantized weights): the adapter must survive.

    Passes when the export's mean |Δlogit| to the adapted model is at most 10% of the
    adapter's own effect (mean |Δlogit| base vs adapted) and >= 95% of argmaxes agree.
    Measured: bf16 demo export 0.033 vs effect 2.38 (1.4%), 100% argmax; the #1172
    4-bit re-quantizing fuse of a small tiny-model adapter 0.062 vs 0.81, 84% argmax (fails).
    """
    cmp_export.update(dtype=dtype, bounds=f"mean |Δlogit| <= {CAST_MEAN_RATIO:g} x the adapter's effect, "
                                         f"argmax agreement >= {CAST_ARGMAX:.0%}")
    limit = CAST_MEAN_RATIO * cmp_base["mean_abs_logit_diff"] if cmp_base else float("inf")
    ok = cmp_export["mean_abs_logit_diff"] <= limit and cmp_export["argmax_agreement"] >= CAST_ARGMAX
    cmp_export["passed"] = ok
    if not ok:
        effect = f"{cmp_base['mean_abs_logit_diff']:.3g}" if cmp_base else "unknown"
        raise VerificationError(
            f"the {dtype} weights lost the adapter: mean |Δlogit| to the adapted model "
            f"{cmp_export['mean_abs_logit_diff']:.3g} (bound {limit:.3g}, 10% of the adapter's effect "
            f"{effect}), argmax agreement {cmp_export['argmax_agreement']:.1%} (bound {CAST_ARGMAX:.0%}). "
            "Export with --dtype float32."
        )
    return cmp_export


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlx", "mlx-lm", "transformers", "torch", "peft", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def stored_dtype(folder: str | Path) -> str:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")


def reference(model_spec: str, adapter_path: str | Path) -> tuple[Any, Any, list, list | None]:
    """Adapter-applied MLX model in fp32: (model, tokenizer, adapted logits, base logits)."""
    from mlx_distill import models

    model, tok, _ = models.load(model_spec, adapter_path, policy="float32")
    full = chat_ids(tok, True)
    return model, tok, mlx_logits(model, full), base_logits(model, full)


def verify_export(
    folder: str | Path, model_spec: str, adapter_path: str | Path, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """``mlx-distill verify``: check an export folder against MODEL + ADAPTER; returns the report."""
    from mlx_distill import export_gguf, export_peft

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json here; pass the folder `mlx-distill export` wrote")
    model, tok, ref, base = reference(model_spec, adapter_path)
    full = chat_ids(tok, True)
    report: dict[str, Any] = {"prompts": len(full), "bounds": bounds()}
    if base is not None:
        report["adapter_effect"] = compare(ref, base)
    peft_dir = folder / "peft"
    if (peft_dir / "adapter_config.json").is_file():
        report["peft_vs_mlx_adapter"] = export_peft.check_peft(
            peft_dir, export_peft.peft_base_dir(peft_dir, model_spec), full, ref, echo)
    del model
    fused, _ = load_mlx_folder(folder)
    cmp = compare(mlx_logits(fused, full), ref)
    dtype = stored_dtype(folder)
    quant = json.loads((folder / "config.json").read_text()).get("quantization")
    if quant:  # e.g. `mlx_lm fuse` without --dequantize: judged like a cast, transformers skipped
        dtype = f"{quant.get('bits', '?')}-bit MLX-quantized"
    if dtype == "float32":
        report["mlx_fused_vs_adapter"] = check_bounds(
            "fused MLX vs adapter-applied MLX", cmp,
            "this folder is not the base with this adapter fused in (wrong --model/--adapter-path, "
            "or the fuse lost the adapter)")
    else:
        report["cast"] = check_cast(cmp, report.get("adapter_effect"), dtype)
    echo(f"verify: fused ({dtype}) vs adapter max |Δlogit| {cmp['max_abs_logit_diff']:.2e}, "
         f"argmax {cmp['argmax_agreement']:.0%}")
    if quant:
        notice = "skipped: MLX-quantized weights, which transformers cannot load (use `mlx-distill export`)"
        echo(f"verify: transformers check {notice}")
        report["transformers_vs_mlx"] = {"skipped": notice}
    else:
        report["transformers_vs_mlx"] = check_transformers(folder, fused, tok, echo)
    for g in sorted(folder.glob("*.gguf")):
        report.setdefault("gguf", []).append(export_gguf.read_back(g, folder))
    report.update(passed=True, versions=versions(), checked_at=_now())
    return report


def bounds() -> dict[str, Any]:
    return {"max_abs_logit_diff": MAX_ABS_LOGIT_DIFF, "argmax_agreement": ARGMAX_AGREEMENT,
            "greedy_tokens": GREEDY_TOKENS, "compute_dtype": "float32"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def report_path(folder: Path) -> Path:
    """``verify.json``, or a timestamped sibling when one exists (never overwritten)."""
    p = folder / "verify.json"
    if not p.exists():
        return p
    return folder / f"verify-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"


@click.command("verify")
@click.argument("folder", type=click.Path())
@click.option("--model", "model_spec", default=None,
              help="Base model the adapter was trained on (demo, .gguf, directory or hub id) "
                   "[default: the model named in the adapter's adapter_config.json].")
@click.option("--adapter-path", required=True, help="The adapter folder the export was made from.")
@click.option("--out", "out_file", type=click.Path(), default=None,
              help="Write the report here [default: FOLDER/verify.json, or a timestamped name if taken].")
@cli_errors
def cli(folder: str, model_spec: str | None, adapter_path: str, out_file: str | None) -> None:
    """Check an exported FOLDER against the adapter-applied MLX model (exit 1 on failure)."""
    from mlx_distill.export import base_spec, read_adapter_config
    from mlx_distill.files import write_json_atomic

    model_spec = base_spec(model_spec, read_adapter_config(Path(adapter_path)), Path(adapter_path))
    report = verify_export(folder, model_spec, adapter_path, echo=lambda s: click.echo(s, err=True))
    path = Path(out_file) if out_file else report_path(Path(folder))
    write_json_atomic(path, report)
    click.echo(f"verify: passed; report in {path}")


if __name__ == "__main__":
    cli()
