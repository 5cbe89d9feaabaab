#!/usr/bin/env python3
"""CPU micro-benchmarks behind the lever table and the "what limits" notes of docs/benchmarks.md.

Measurements, each in its own subprocess (the BLAS choice is made when
``mlx_distill`` is imported), on the embedded demo model's shapes, fp32:

* ``skinny``: one matmul of 8 rows by a weight (the lm_head, 1536 x 1536,
  1536 x 576): OpenBLAS alone (``MLX_DISTILL_BLAS=openblas
  MLX_DISTILL_SKINNY_BLAS=0``), through the shim to BLIS
  (``MLX_DISTILL_SKINNY_KERNEL=0``), to the shim's own kernel (the default),
  and MKL (``MLX_DISTILL_BLAS=mkl``, when installed); and whether BLIS's
  ``sgemm_`` binds to BLIS (``LD_DEBUG``).
* ``softmax``: the fast-ops softmax of 4 x 9 x 353 x 353 attention scores
  (compiled) and its pieces: the fused ``x - max`` + exp chain, the same chain
  over a precomputed array, the row max, the row sum.
* ``head``: the lm_head + cross-entropy and its gradient for 4 x 353 positions
  (compiled): peak memory and time, whole logits vs 256- and 64-row chunks, with
  and without the chunk-by-chunk ordering (``mx.depends``).
* ``forward``: the compiled forward of the demo model's 30 layers (4 x 353
  tokens, CPU levers on), with and without the two CPU streams, vs the same
  layers' matmuls alone.
* ``decode``: one decode step of the demo model for 8 rows over a 100-token
  KV cache vs its 211 matmuls alone, and the same matmuls for one row (the
  fp32 bandwidth floor), with the shim's kernel and with BLIS.
* ``generate``: ``generate_batch`` (mlx-lm's BatchGenerator, on a stream of
  its own: ``MLX_DISTILL_FAST_DECODE=0`` here, since greedy decoding on the
  CPU otherwise runs on ``fastdecode``) for 8 prompts, then a bare greedy loop over the same left-padded
  batch on the default stream, ms a step each; on OpenBLAS and on MKL (MKL's
  OpenMP teams once MLX has called it from two threads).
* ``validation``: a validation over 2 batches of 4 x 353 random tokens with
  LoRA on the last 16 of 30 layers (CPU levers on): recomputed each time vs
  started from the frozen layers' stored output (``training.validation``),
  alternating.
* ``lookup`` (run alone: ``--worker lookup``): prompt-lookup decoding's
  costs: a call of 8 rows at 1-4 tokens a row with mlx-lm's cache and with
  ``lookup``'s (attention one query at a time), MLX's attention for 1 and 4
  queries a row, the step's matmuls at 8 / 16 / 32 rows, and ``lookup.decode``
  of 8 prompts at 0-3 drafts a row (calls, tokens a call, ms a call).
* ``decode_rows``: the same step for 4 to 32 rows: OpenBLAS alone, every
  skinny matmul to BLIS (``MLX_DISTILL_SKINNY_KERNEL=0
  MLX_DISTILL_SKINNY_ROWS=32``), the shim's kernel (the default, up to
  ``KERNEL_ROWS``), MKL: where the row limits belong.

The other measurements run on the default BLAS (OpenBLAS; ``MLX_DISTILL_BLAS`` changes it).

Usage: scripts/bench_cpu_ops.py [--reps 10] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))


def _timed_ms(fn: Any, reps: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    best = float("inf")
    for _ in range(2):  # best of two batches of reps
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - t) / reps * 1000)
    return round(best, 3)


def worker_skinny(reps: int) -> dict:
    import mlx_distill  # noqa: F401  (MKL or OpenBLAS (+ the BLIS shim unless MLX_DISTILL_SKINNY_BLAS=0))

    # isort: split
    import mlx.core as mx

    out = {}
    for n, k in ((49152, 576), (1536, 1536), (1536, 576)):
        x, w = mx.random.normal((8, k)), mx.random.normal((n, k))
        mx.eval(x, w)
        out[f"8x{k}@{k}x{n}"] = _timed_ms(lambda x=x, w=w: x @ w.T, reps if n < 10000 else max(2, reps // 5))
    return out


def blis_binds_to_itself() -> bool | None:
    """None without the shim; else whether BLIS's ``sgemm_`` binds inside BLIS (the shim serves OpenBLAS only)."""
    from mlx_distill import _skinny_blas

    blis = _skinny_blas.blis_path()
    if blis is None:
        return None
    code = "import mlx_distill, mlx.core as mx; mx.eval(mx.ones((8, 576)) @ mx.ones((2048, 576)).T)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LD_DEBUG": "bindings", "MLX_DISTILL_BLAS": "openblas"})
    lines = [x for x in res.stderr.splitlines() if f"binding file {blis} " in x and "symbol `sgemm_'" in x]
    return bool(lines) and all(f" to {blis} " in x for x in lines)


def worker_softmax(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx

    from mlx_distill.training import fastops
    from mlx_distill.training.cpu_levers import native_cpu_jit

    with native_cpu_jit(True):
        s = mx.random.normal((4, 3, 1059, 353))  # 4 x 9 heads x 353 queries, grouped by KV head
        m = mx.max(s, axis=-1, keepdims=True)
        d = s - m
        mx.eval(s, m, d)
        softmax, chain, chain_pre = (mx.compile(fastops.softmax),
                                     mx.compile(lambda s, m: fastops.exp_neg(s - m)), mx.compile(fastops.exp_neg))
        return {"elements": s.size,
                "softmax_ms": _timed_ms(lambda: softmax(s), reps),
                "sub_exp_chain_ms": _timed_ms(lambda: chain(s, m), reps),
                "exp_chain_precomputed_ms": _timed_ms(lambda: chain_pre(d), reps),
                "row_max_ms": _timed_ms(lambda: mx.max(s, axis=-1), reps),
                "row_sum_ms": _timed_ms(lambda: mx.sum(s, axis=-1), reps)}


def worker_head(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx

    from mlx_distill.training import fastops, headce
    from mlx_distill.training.cpu_levers import native_cpu_jit

    n, d, V = 4 * 353, 576, 49152
    h = mx.random.normal((n, d)) * 0.1
    w = mx.random.normal((V, d)) * 0.05
    t = mx.random.randint(0, V, (n,))
    mx.eval(h, w, t)
    depends = mx.depends
    out = {}
    with native_cpu_jit(True):
        for name, rows, ordered in (("whole", None, True), ("256_unordered", 256, False), ("256", 256, True),
                                    ("64_unordered", 64, False), ("64", 64, True)):
            mx.depends = depends if ordered else (lambda x, _deps: x)
            headce._HEAD_OPS.clear()  # rebuilt with this mx.depends
            if rows is None:
                fn = mx.compile(mx.grad(lambda h: fastops.cross_entropy(h @ w.T, t).sum()))
            else:
                fn = mx.compile(mx.grad(lambda h, r=rows: headce.head_cross_entropy_and_hits(h, w, t, r)[0].sum()))
            mx.eval(fn(h))
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            ms = _timed_ms(lambda fn=fn: fn(h), max(1, reps // 5))
            out[name] = {"peak_mb": round((mx.get_peak_memory() - base) / 1e6), "ms": ms}
    mx.depends = depends
    return out


def worker_decode(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_distill import models

    model, _, _ = models.load("demo")
    rows = 8
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * 100] * rows), cache=cache))
    y = mx.array([[5]] * rows)

    def step() -> Any:  # the cache grows by a token a call, as in decoding
        return mx.argmax(model(y, cache=cache)[:, -1], axis=-1)

    weights = [m.weight for _, m in model.named_modules() if getattr(m, "weight", None) is not None
               and m.weight.ndim == 2]
    xs = {k: mx.random.normal((rows, 1, k)) for k in {w.shape[1] for w in weights}}
    x1 = {k: v[:1] for k, v in xs.items()}  # one row: the same bytes, an eighth of the arithmetic
    mx.eval(list(xs.values()), list(x1.values()))
    return {"step_ms": _timed_ms(step, reps), "matmuls": len(weights),
            "matmuls_ms": _timed_ms(lambda: [xs[w.shape[1]] @ w.T for w in weights], reps),
            "matmuls_1row_ms": _timed_ms(lambda: [x1[w.shape[1]] @ w.T for w in weights], reps),
            "weights_mb": round(sum(w.nbytes for w in weights) / 1e6)}


def worker_generate(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_distill import _blas, fastdecode, models
    from mlx_distill.generate import chat_tokens, generate_batch

    os.environ[fastdecode.ENV] = "0"  # BatchGenerator on its own stream: the two-thread case this worker measures
    model, tok, _ = models.load("demo")
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "prompts" / "base.jsonl").read_text().splitlines()][:8]
    n = 10 * reps  # new tokens a row
    generate_batch(model, tok, prompts[:2], max_tokens=4, batch_size=2)  # warm-up
    t = time.perf_counter()
    out = generate_batch(model, tok, prompts, max_tokens=n, batch_size=8)
    gen_s = time.perf_counter() - t
    enc = [chat_tokens(tok, p, None) for p in prompts]
    width = max(len(e) for e in enc)
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([[0] * (width - len(e)) + e for e in enc]), cache=cache)[:, -1], axis=-1)[:, None]
    mx.eval(y)
    t = time.perf_counter()
    for _ in range(n):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
        mx.eval(y)
    return {"blas": _blas.kind(), "tokens": n, "longest": max(c.completion_tokens for c in out),
            "generate_batch_s": round(gen_s, 2), "bare_loop_ms_a_step": round((time.perf_counter() - t) / n * 1000, 1)}


DECODE_ROWS = (4, 8, 12, 16, 24, 32)


def worker_decode_rows(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_distill import models

    model, _, _ = models.load("demo")
    out = {}
    for rows in DECODE_ROWS:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1] * 100] * rows), cache=cache))
        y = mx.array([[5]] * rows)
        out[str(rows)] = _timed_ms(lambda y=y, cache=cache: mx.argmax(model(y, cache=cache)[:, -1], axis=-1), reps)
    return out


def worker_forward(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx

    from mlx_distill import models
    from mlx_distill.training.cpu_levers import cpu_levers

    model, _, _ = models.load("demo")
    x = mx.random.randint(3, 1000, (4, 353))
    layers = model.model.layers
    weights = [m.weight for layer in layers for _, m in layer.named_modules()
               if getattr(m, "weight", None) is not None and m.weight.ndim == 2]
    xs = {k: mx.random.normal((4 * 353, k)) for k in {w.shape[1] for w in weights}}
    mx.eval(x, list(xs.values()))
    with cpu_levers(model):  # the training forward: fast ops, native JIT, two streams (unless turned off)
        body = mx.compile(lambda x: model.model(x), inputs=[model.state])
        forward_ms = _timed_ms(lambda: body(x), max(1, reps // 5))
    from mlx_distill import _blas

    return {"layers": len(layers), "forward_ms": forward_ms, "blas": _blas.kind(),
            "matmuls_ms": _timed_ms(lambda: [xs[w.shape[1]] @ w.T for w in weights], max(1, reps // 5))}


def worker_validation(reps: int) -> dict:
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_distill import models
    from mlx_distill.training.cpu_levers import cpu_levers
    from mlx_distill.training.loop import LoopSettings
    from mlx_distill.training.losses import lm_loss
    from mlx_distill.training.prefix import frozen_prefix
    from mlx_distill.training.validation import compiled_eval_loss, evaluate

    model, _, _ = models.load("demo")
    model.freeze()
    linear_to_lora_layers(model, 16, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    batches = [(mx.random.randint(3, 1000, (4, 354)), mx.array([[40, 354]] * 4)) for _ in range(2)]
    mx.eval(model.parameters(), batches)

    def it(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, comm_group: Any = None) -> Any:
        yield from batches

    settings = LoopSettings(batch_size=4, max_seq_length=4096, total_steps=1, steps_per_epoch=1, eval_every=0,
                            save_every=0)
    group = mx.distributed.init()

    def run(compiled: Any, prefix: Any = None) -> tuple[float, float]:
        t = time.perf_counter()
        loss = evaluate(model, None, settings, lm_loss, it, group, compiled=compiled, prefix=prefix, again=True)
        return time.perf_counter() - t, loss["loss"]

    with cpu_levers(model), frozen_prefix(model) as prefix:
        plain, three = compiled_eval_loss(model, lm_loss), compiled_eval_loss(model, lm_loss, prefix)
        run(plain)  # compiles
        capture_s, _ = run(three, prefix)  # compiles and stores
        times: dict[str, list[float]] = {"plain": [], "replay": []}
        losses: dict[str, float] = {}
        for _ in range(max(3, reps // 3)):  # alternating, so both see the same load
            for name, args in (("plain", (plain,)), ("replay", (three, prefix))):
                took, loss = run(*args)
                times[name].append(took)
                losses[name] = loss
    return {"plain_s": min(times["plain"]), "capture_s": capture_s, "replay_s": min(times["replay"]),
            "rounds": len(times["plain"]), "depth": prefix.depth, "tokens": 2 * 4 * 353,
            "loss_diff": abs(losses["plain"] - losses["replay"])}


def worker_lookup(reps: int) -> dict:
    """Prompt-lookup decoding's costs: a model call of 8 rows at 1-4 tokens a row, attention and matmuls by rows."""
    import mlx_distill  # noqa: F401

    # isort: split
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_distill import lookup, models
    from mlx_distill.generate import chat_tokens

    model, tok, _ = models.load("demo")
    rows, width = 8, 150
    out: dict[str, Any] = {}
    cache = make_prompt_cache(model)  # mlx-lm's cache: "causal" attention for several tokens a row
    mx.eval(model(mx.array([[1] * width] * rows), cache=cache))

    def plain(n: int) -> Any:
        y = mx.argmax(model(mx.array([[5] * n] * rows), cache=cache), axis=-1)
        mx.eval(y)
        for c in cache:
            c.trim(n)
        return y

    state = lookup._Rows(mx.zeros((rows,), mx.int32))
    caches = [lookup._LayerCache(state) for _ in model.layers]
    state.incoming = mx.ones((rows, width), mx.bool_)
    mx.eval(model(mx.array([[1] * width] * rows), cache=caches))
    state.valid, state.offset = mx.ones((rows, width), mx.bool_), state.offset + width

    def holey(n: int) -> Any:
        state.incoming = mx.ones((rows, n), mx.bool_)
        y = mx.argmax(model(mx.array([[5] * n] * rows), cache=caches), axis=-1)
        mx.eval(y)
        for c in caches:
            c.used -= n
        return y

    out["call_ms_mlx_lm_cache"] = {n: _timed_ms(lambda n=n: plain(n), max(2, reps // 2)) for n in (1, 4)}
    with lookup._attention_by_query(model):
        out["call_ms_lookup_cache"] = {n: _timed_ms(lambda n=n: holey(n), max(2, reps // 2)) for n in (1, 2, 3, 4)}
    k, v = mx.random.normal((rows, 3, 104, 64)), mx.random.normal((rows, 3, 104, 64))
    sdpa = mx.fast.scaled_dot_product_attention
    for n in (1, 4):
        q = mx.random.normal((rows, 9, n, 64))
        m = mx.ones((rows, 1, n, 104), mx.bool_)
        out[f"attention_ms_{n}_queries"] = {
            "no_mask": _timed_ms(lambda q=q: sdpa(q, k, v, scale=0.125, mask=None), reps),
            "causal": _timed_ms(lambda q=q: sdpa(q, k, v, scale=0.125, mask="causal"), reps),
            "bool_mask": _timed_ms(lambda q=q, m=m: sdpa(q, k, v, scale=0.125, mask=m), reps)}
    weights = [m.weight for _, m in model.named_modules() if getattr(m, "weight", None) is not None
               and m.weight.ndim == 2]
    out["matmuls_ms_by_rows"] = {}
    for n in (8, 16, 32):
        xs = {d: mx.random.normal((n, 1, d)) for d in {w.shape[1] for w in weights}}
        mx.eval(list(xs.values()))
        out["matmuls_ms_by_rows"][n] = _timed_ms(lambda xs=xs: [xs[w.shape[1]] @ w.T for w in weights],
                                                 max(2, reps // 2))
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "prompts" / "base.jsonl").read_text().splitlines()][:8]
    enc = [chat_tokens(tok, p) for p in prompts]
    out["decode_160_tokens"] = {}
    for k_drafts in (0, 1, 2, 3):
        t = time.perf_counter()
        _, counts = lookup.decode(model, enc, max_tokens=160, stop=set(tok.eos_token_ids), k=k_drafts)
        took = time.perf_counter() - t
        out["decode_160_tokens"][k_drafts] = {**counts, "s": round(took, 2),
                                              "ms_a_call": round(took / counts["calls"] * 1000, 1),
                                              "tokens_a_call": round(counts["tokens"] / counts["calls"], 2)}
    return out


WORKERS = {"skinny": worker_skinny, "softmax": worker_softmax, "head": worker_head, "decode": worker_decode,
           "decode_rows": worker_decode_rows, "generate": worker_generate, "forward": worker_forward,
           "validation": worker_validation, "lookup": worker_lookup}


def run(kind: str, reps: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--reps", str(reps)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-3000:])
        raise SystemExit(f"{kind} worker failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--section", default="cpu-ops", help="docs/benchmarks.md section (another box's run: its own)")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.reps)))
        return

    from _benchlib import emit, write_section

    from mlx_distill._skinny_blas import KERNEL_ROWS

    load0 = os.getloadavg()[0]
    figures: dict[str, Any] = {"bench": "cpu-ops", "reps": args.reps}
    from mlx_distill import _blas

    openblas = {"MLX_DISTILL_BLAS": "openblas"}
    mkl = _blas.mkl_path() is not None
    figures["skinny_openblas_ms"] = run("skinny", args.reps, {**openblas, "MLX_DISTILL_SKINNY_BLAS": "0"})
    blis = {**openblas, "MLX_DISTILL_SKINNY_KERNEL": "0"}
    figures["skinny_blis_ms"] = run("skinny", args.reps, blis)
    figures["skinny_kernel_ms"] = run("skinny", args.reps, openblas)
    figures["skinny_mkl_ms"] = run("skinny", args.reps, {"MLX_DISTILL_BLAS": "mkl"}) if mkl else None
    figures["blis_sgemm_binds_to_blis"] = blis_binds_to_itself()
    figures["softmax"] = run("softmax", args.reps)
    figures["head"] = run("head", args.reps)
    figures["decode"] = run("decode", args.reps)
    figures["decode_blis"] = run("decode", args.reps, blis)
    figures["decode_rows_openblas_ms"] = run("decode_rows", args.reps, {**openblas, "MLX_DISTILL_SKINNY_BLAS": "0"})
    figures["decode_rows_blis_ms"] = run("decode_rows", args.reps, {**blis, "MLX_DISTILL_SKINNY_ROWS": "32"})
    figures["decode_rows_kernel_ms"] = run("decode_rows", args.reps, openblas)
    figures["decode_rows_mkl_ms"] = run("decode_rows", args.reps, {"MLX_DISTILL_BLAS": "mkl"}) if mkl else None
    figures["generate"] = [run("generate", args.reps, openblas)] + (
        [run("generate", args.reps, {"MLX_DISTILL_BLAS": "mkl"})] if mkl else [])
    figures["forward"] = run("forward", args.reps)
    figures["forward_one_stream"] = run("forward", args.reps, {"MLX_DISTILL_CPU_STREAMS": "0"})
    figures["validation"] = run("validation", args.reps)
    figures["blas"] = figures["forward"]["blas"]  # the default BLAS, which the other measurements ran on
    figures["load_avg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]

    ob, bl, kn, sm, hd, dc, fw = (figures["skinny_openblas_ms"], figures["skinny_blis_ms"], figures["skinny_kernel_ms"],
                                  figures["softmax"], figures["head"], figures["decode"], figures["forward"])
    dcb = figures["decode_blis"]
    fw1, va = figures["forward_one_stream"], figures["validation"]
    mk = figures["skinny_mkl_ms"] or {}
    skinny_rows = "\n".join(f"| {shape} | {ob[shape]:.2f} | {bl[shape]:.2f} | {kn[shape]:.2f} | "
                            f"{bl[shape] / kn[shape]:.2f}x | {f'{mk[shape]:.2f}' if mk else '-'} |" for shape in ob)
    dro, drb, drk = (figures["decode_rows_openblas_ms"], figures["decode_rows_blis_ms"],
                     figures["decode_rows_kernel_ms"])
    drm = figures["decode_rows_mkl_ms"] or {}
    decode_rows = "\n".join(f"| {r} | {dro[r]:.1f} | {drb[r]:.1f} | {drk[r]:.1f} | {min(dro[r], drb[r]) / drk[r]:.2f}x | "
                             f"{f'{drm[r]:.1f}' if drm else '-'} |" for r in dro)
    gen_rows = "\n".join(f"| {g['blas']} | {g['generate_batch_s']:.2f} s (longest row {g['longest']}) | "
                         f"{g['bare_loop_ms_a_step']:.1f} |" for g in figures["generate"])
    head_rows = "\n".join(f"| {name.replace('_', ' ')} | {v['peak_mb']} | {v['ms']:.0f} |" for name, v in hd.items())
    ns = sm["softmax_ms"] * 1e6 / sm["elements"]
    body = f"""
`scripts/bench_cpu_ops.py --reps {args.reps}`: the micro-measurements behind the lever table and the
"what limits" notes; each in its own process, fp32, best of two batches of {args.reps} calls, on
{figures['blas']} unless a table says otherwise. The
1-minute load average was {figures['load_avg'][0]} before and {figures['load_avg'][1]} after, on
{os.cpu_count()} cores.

Skinny matmuls, 8 rows (ms a call, the same weight every call: the two small ones stay in cache, the lm_head does not; BLIS through `_skinny_blas`
with its kernel off, whose BLIS `sgemm_` binds to BLIS itself: {figures['blis_sgemm_binds_to_blis']}):

| x @ weight | OpenBLAS | BLIS (shim) | shim's kernel | BLIS / kernel | MKL |
| --- | ---: | ---: | ---: | ---: | ---: |
{skinny_rows}

Training forward of the demo model's {fw['layers']} layers (compiled, CPU levers on, 4 x 353 tokens, no
head): {fw['forward_ms']:.0f} ms, {fw['forward_ms'] / fw['layers']:.0f} ms a layer, with the batch's halves on two
CPU streams ({figures['blas']} at half the cores); {fw1['forward_ms']:.0f} ms on one stream
(`MLX_DISTILL_CPU_STREAMS=0`). The same layers' matmuls alone, one stream, {figures['blas']} on every core:
{fw1['matmuls_ms']:.0f} ms.

Validation, {va['tokens']:,} random tokens in 2 batches, LoRA on the last 16 of 30 layers (best of
{va['rounds']} alternating runs each): recomputed each time {va['plain_s']:.2f} s; from the frozen layers' (0-{va['depth'] - 1}) stored
output {va['replay_s']:.2f} s (**{va['plain_s'] / va['replay_s']:.2f}x**; the first, storing, run {va['capture_s']:.2f} s
with its compilation); loss difference {va['loss_diff']:.1e}.

Attention softmax over {sm['elements']:,} scores (4 x 9 x 353 x 353), compiled, one thread:
{sm['softmax_ms']:.1f} ms ({ns:.1f} ns an element). Pieces: the fused `x - max` + exp chain
{sm['sub_exp_chain_ms']:.1f} ms (over a precomputed `x - max`: {sm['exp_chain_precomputed_ms']:.1f} ms),
the row max {sm['row_max_ms']:.1f} ms, the row sum {sm['row_sum_ms']:.1f} ms.

lm_head + cross-entropy and its gradient, 1412 positions, 49,152 words, compiled ("unordered":
the chunks without `mx.depends` on the previous one):

| logits | peak memory (MB) | ms |
| --- | ---: | ---: |
{head_rows}

Decoding, the demo model, 8 rows over a 100-token KV cache: one step {dc['step_ms']:.1f} ms; its
{dc['matmuls']} matmuls alone {dc['matmuls_ms']:.1f} ms ({dc['weights_mb']} MB of weights read per step,
{dc['weights_mb'] / dc['matmuls_ms']:.1f} GB/s) on the shim's kernel; on BLIS {dcb['step_ms']:.1f} ms and
{dcb['matmuls_ms']:.1f} ms ({dcb['weights_mb'] / dcb['matmuls_ms']:.1f} GB/s). The same matmuls for one row (the same
bytes, an eighth of the arithmetic: how fast the weights can stream): {dc['matmuls_1row_ms']:.1f} ms
({dc['weights_mb'] / dc['matmuls_1row_ms']:.1f} GB/s) on the kernel, {dcb['matmuls_1row_ms']:.1f} ms on BLIS.

The same decode step by rows (ms a step, 100-token KV cache): OpenBLAS alone (`MLX_DISTILL_SKINNY_BLAS=0`),
every skinny matmul to BLIS (`MLX_DISTILL_SKINNY_KERNEL=0 MLX_DISTILL_SKINNY_ROWS=32`), and the default: a
Linear's matmuls of up to {KERNEL_ROWS} rows to the shim's kernel (`_skinny_blas.KERNEL_ROWS`), the rest as before:

| rows | OpenBLAS | BLIS | shim's kernel | better of the two / kernel | MKL |
| ---: | ---: | ---: | ---: | ---: | ---: |
{decode_rows}

Generation, 8 prompts of `prompts/base.jsonl`, {figures['generate'][0]['tokens']} new tokens a row: `generate_batch`
(its own stream), then in the same process a bare greedy loop over the same left-padded batch on the
default stream:

| BLAS | `generate_batch` | bare loop afterwards, ms a step |
| --- | ---: | ---: |
{gen_rows}
"""
    if not args.no_write:
        write_section(args.section, "CPU micro-benchmarks: skinny matmuls, softmax, lm_head memory, decode floor", body)
    print(body)
    emit(figures)


if __name__ == "__main__":
    main()
