#!/usr/bin/env python
"""LoRA training throughput: mlx-distill's trainer (MLX) vs torch + peft, same machine, same batches.

Both train the same model with the same LoRA (rank, scale = lora_alpha / r,
the 7 linear modules of the last N layers), the same optimizer (Adam with
bias correction, lr 1e-4) and the *same token batches*, saved once to .npz
and replayed by both. Each run is its own subprocess, one after the other,
with the same thread count, so its peak RSS is its own; warm-up steps
(compilation, allocator growth, torch's slow first steps) are excluded.

Ways (``--ways``):

* ``mlx``: the trainer as users get it (``training.loop.run_loop``: the CPU
  levers of ``training.cpu_levers`` apply on a CPU: fast exp ops, native JIT,
  the lm_head + cross-entropy in chunks).
* ``mlx-plain``: the same trainer with every CPU lever switched off by its
  environment variable: the "before" of docs/benchmarks.md.
* ``mlx-no-<lever>``: ``mlx`` with one lever off.
* ``mlx-head64``: ``mlx`` with the lm_head + cross-entropy in chunks of 64
  positions (``headce.LEAN_CHUNK_ROWS``, the ``--grad-checkpoint`` size)
  instead of the lever's 256.
* ``mlx-mkl``, ``mlx-mkl-epoch2``: ``mlx`` and ``mlx-epoch2`` with MLX's matmuls
  on Intel MKL (``MLX_DISTILL_BLAS=mkl``, opt-in; skipped when not installed).
* ``mlx-gc``: ``mlx`` with ``--grad-checkpoint`` (the RSS figure).
* ``mlx-epoch2``: ``mlx`` trained for two epochs over the batches, measured in
  the second, where each row starts from the frozen layers' output kept in
  the first (``training.prefix``); torch recomputes them in every epoch.
* ``torch``: transformers + peft, eager, fp32 (bf16 with ``--dtype bfloat16``).

Models: ``--model demo`` is the embedded SmolLM2-135M (fp32) trained on the
hand-written examples (real token lengths); ``--model synthetic`` is a
random-weight model of the same shape (or ``--shape qwen0.5b``) saved once as
safetensors and loaded by both frameworks, with random tokens of the same
lengths: speed does not depend on the weights' values, and nothing of this
machine is needed (this is how ``--device gpu`` runs on a CUDA box with
``mlx[cuda]``, torch and peft).

FLOPs per real token, the same for both: forward 2*(layer weights + lm_head)
+ 4*T*d per layer (attention), backward 2*(adapted layers + lm_head) + 8*T*d
per adapted layer (input gradients only; the base is frozen; LoRA's own FLOPs
are left out), as a share of MLX's matmul peak measured in the same run.

Usage: scripts/bench_train.py [--model demo|synthetic] [--device cpu|gpu] [--steps 5] [--warmup 3]
       [--ways mlx,torch,mlx-plain,mlx-gc] [--rounds 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEVER_ENV = {"fastops": ("MLX_DISTILL_FAST_OPS", "0"), "native": ("MLX_DISTILL_NATIVE_JIT", "0"),
             "skinny": ("MLX_DISTILL_SKINNY_BLAS", "0"), "chunkedhead": ("MLX_DISTILL_CHUNKED_HEAD", "0"),
             "streams": ("MLX_DISTILL_CPU_STREAMS", "0"), "lossrows": ("MLX_DISTILL_LOSS_ROWS", "0"),
             "flat": ("MLX_DISTILL_FLAT_SECOND", "0")}
LEVERS_OFF = dict(LEVER_ENV.values())
# "mlx-no-<lever>": the trainer with one lever switched off (the ablation rows of the docs).
WAYS = ["mlx", "mlx-plain", "mlx-gc", "mlx-epoch2", "mlx-mkl", "mlx-mkl-epoch2", "torch", "mlx-head64",
        *(f"mlx-no-{k}" for k in LEVER_ENV)]
MKL_ENV = {"MLX_DISTILL_BLAS": "mkl"}  # the opt-in BLAS of the mlx-mkl ways
SHAPES = {
    # SmolLM2-135M (the demo student) and Qwen2.5-0.5B, llama-family layouts.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0),
    "qwen0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                     num_key_value_heads=2, head_dim=64, vocab_size=151936, rope_theta=1000000.0),
}


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024**3 if sys.platform == "darwin" else 1024**2)


def load_batches(path: str) -> list[tuple]:
    import numpy as np

    data = np.load(path)
    return [(data[f"tokens_{i}"], data[f"lengths_{i}"]) for i in range(int(data["count"]))]


# -- workers (each runs in its own subprocess) --------------------------------------------------


def worker_matmul(args: argparse.Namespace) -> None:
    import mlx_distill  # noqa: F401  (loads MKL or OpenBLAS unless MLX_DISTILL_BLAS=off)

    # isort: split
    import mlx.core as mx

    from mlx_distill import _blas

    gpu = args.device == "gpu"
    if gpu:
        mx.set_default_device(mx.gpu)
    n = 4096 if gpu else 1024
    dtype = getattr(mx, args.dtype)
    a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)
    reps = 20 if gpu else 1
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        # Every product is evaluated: MLX is lazy, and an unevaluated one costs nothing.
        mx.eval([a @ b for _ in range(reps)])
        best = min(best, (time.perf_counter() - t) / reps)
    Path(args.out).write_text(json.dumps({"gflops": 2 * n**3 / best / 1e9, "blas": _blas.kind(), "n": n}))


def worker_mlx(args: argparse.Namespace) -> None:
    import mlx_distill  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from mlx_distill import models
    from mlx_distill.train import TrainConfig, _optimizer, _setup_model
    from mlx_distill.training import headce
    from mlx_distill.training.loop import LoopSettings, grad_checkpointing, run_loop

    if args.head_rows:  # the mlx-head64 way
        headce.CHUNK_ROWS = args.head_rows

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    batches = load_batches(args.batches)
    policy = "float32" if args.dtype == "float32" else "native"
    model, _ = load_model(Path(args.model_dir))  # the weights only: a synthetic model has no tokenizer
    models.apply_dtype_policy(model, policy)
    if args.dtype != "float32":
        model.set_dtype(getattr(mx, args.dtype))
    cfg = TrainConfig(model=args.model_dir, data="-", batch_size=args.batch_size, lora_rank=args.rank,
                      lora_scale=args.scale, num_layers=args.layers, learning_rate=1e-4, iters=len(batches))
    _setup_model(model, cfg, args.layers)
    optimizer = _optimizer(cfg, len(batches))
    optimizer.init(model.trainable_parameters())

    def replay(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):  # noqa: ANN001
        for _ in range(args.epochs):
            for tokens, lengths in batches:
                yield mx.array(tokens), mx.array(lengths)

    steps: list[dict] = []
    logs: list[str] = []
    settings = LoopSettings(batch_size=args.batch_size, max_seq_length=1 << 16,
                            total_steps=args.epochs * len(batches), steps_per_epoch=len(batches),
                            eval_every=0, save_every=0)
    with grad_checkpointing(model, args.grad_checkpoint):
        run_loop(model, optimizer, None, None, settings, loss=_loss(), iterate_batches=replay,
                 group=mx.distributed.init(), write=lambda r: None, checkpoint=lambda step, state: None,
                 on_step=steps.append, progress=False, echo=logs.append)
    steps = steps[-len(batches):]  # the last epoch's
    Path(args.out).write_text(json.dumps({
        "step_s": [r["step_s"] for r in steps], "tokens": [r["tokens"] for r in steps],
        "loss": [r["loss"] for r in steps], "peak_rss_gb": peak_rss_gb(),
        "peak_mem_gb": mx.get_peak_memory() / 1e9, "log": logs,
    }))


def _loss():  # noqa: ANN202
    from mlx_distill.training.losses import lm_loss

    return lm_loss


def worker_torch(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gpu = args.device == "gpu"
    dev = "cuda" if gpu else "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = load_batches(args.batches)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(dev)
    model.config.use_cache = False
    n = model.config.num_hidden_layers
    lora = LoraConfig(r=args.rank, lora_alpha=args.rank * args.scale, lora_dropout=0.0, bias="none",
                      target_modules=MODULES, layers_to_transform=list(range(n - args.layers, n)))
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    step_s, tokens, losses = [], [], []
    for toks, lens in batches:
        t = time.perf_counter()
        x = torch.from_numpy(toks.astype(np.int64)).to(dev)
        inputs, targets = x[:, :-1], x[:, 1:]
        steps = torch.arange(1, targets.shape[1] + 1, device=dev)
        lens_t = torch.from_numpy(lens.astype(np.int64)).to(dev)
        mask = (steps >= lens_t[:, :1]) & (steps < lens_t[:, 1:])  # as mlx_distill.training.losses
        logits = model(input_ids=inputs).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (ce * mask.reshape(-1)).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss)  # a sync point, like MLX's eval
        if gpu:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
        tokens.append(int(lens[:, 1].sum()))
        losses.append(value)
    Path(args.out).write_text(json.dumps({
        "step_s": step_s, "tokens": tokens, "loss": losses, "peak_rss_gb": peak_rss_gb(),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None,
        "threads": torch.get_num_threads()}))


# -- the parent ----------------------------------------------------------------------------------


def demo_batches(args: argparse.Namespace, work: Path) -> tuple[str, list, dict]:
    """The embedded model and batches of the hand-written examples (mlx-distill's own batcher)."""
    import mlx_distill  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import numpy as np
    from mlx_lm.utils import load_tokenizer

    from mlx_distill.dataset import PrepareConfig, prepare
    from mlx_distill.models import demo_model_dir
    from mlx_distill.training.data import iterate_batches, load_data

    model_dir = demo_model_dir("float32")
    data_dir = work / "data"
    # Teacher answers run to hundreds of tokens; the hand-written ones are 127-217
    # tokens with the template. --answer-copies 2 joins each answer with the next
    # one (~220-330 tokens), close to the 300-500 of the figures in FACTS.md.
    rows = [json.loads(line) for line in (ROOT / "examples" / "teacher_data.jsonl").read_text().splitlines()]
    joined = [{**r, "response": "\n\n".join(rows[(i + k) % len(rows)]["response"] for k in range(args.answer_copies))}
              for i, r in enumerate(rows)]
    teacher = work / "teacher_data.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in joined))
    prepare(PrepareConfig(teacher_data=str(teacher), out=str(data_dir), valid_fraction=0.0), echo=lambda _: None)
    train_set, _ = load_data(data_dir, load_tokenizer(model_dir, eos_token_ids=[2]), max_seq_length=4096)
    it = iterate_batches(train_set, args.batch_size, 4096, loop=True, seed=0)
    batches = [tuple(np.array(a) for a in next(it)) for _ in range(args.warmup + args.steps)]
    lens = [len(t) for t, _ in train_set.items]
    return str(model_dir), batches, {"examples": len(train_set), "tokens_min": min(lens), "tokens_max": max(lens),
                                     "source": f"the {len(train_set)} hand-written examples, {args.answer_copies} "
                                               "answers joined per example"}


def synthetic_batches(args: argparse.Namespace, work: Path) -> tuple[str, list, dict]:
    """A random-weight model of ``--shape`` (safetensors + HF config) and random-token batches."""
    import numpy as np

    shape = SHAPES[args.shape]
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
           "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_traditional": False,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32", **shape}
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, f, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    tensors = {"model.embed_tokens.weight": (V, d), "model.norm.weight": None}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                        p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                        p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": None,
                        p + "post_attention_layernorm.weight": None})
    arrays = {k: (np.ones(d, np.float32) if s is None else (rng.standard_normal(s, np.float32) * 0.02))
              for k, s in tensors.items()}
    from safetensors.numpy import save_file

    save_file(arrays, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    # Lengths like the demo data's (220-330 tokens with a ~40-token prompt), rows sorted into batches.
    lens = rng.integers(args.min_len, args.max_len + 1, size=(args.warmup + args.steps) * args.batch_size)
    batches = []
    for i in range(args.warmup + args.steps):
        rows = np.sort(lens[i * args.batch_size:(i + 1) * args.batch_size])
        width = 1 + 32 * int(np.ceil(rows.max() / 32))
        tokens = rng.integers(3, V, size=(args.batch_size, width)).astype(np.int32)
        lengths = np.stack([np.full_like(rows, 40), rows], axis=1).astype(np.int32)
        batches.append((tokens, lengths))
    return str(model_dir), batches, {"examples": len(lens), "tokens_min": int(lens.min()),
                                     "tokens_max": int(lens.max()),
                                     "source": f"random tokens, lengths {args.min_len}-{args.max_len}"}


def run_worker(kind: str, extra: list[str], env: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-")) / "result.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--out", str(out), *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"{kind} worker failed (exit {res.returncode})")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t
    return result


def flops_per_token(cfg: dict, adapted: int, mean_width: float, forward_layers: int | None = None) -> float:
    """``forward_layers``: the layers whose forward runs (default all; the adapted ones when the frozen are reused)."""
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    L = L if forward_layers is None else forward_layers
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg["num_key_value_heads"] * hd
    per_layer = 2 * d * heads * hd + 2 * d * kv + 3 * d * f  # q, o + k, v + gate, up, down
    attn = 4 * mean_width * heads * hd
    forward = 2 * (L * per_layer + d * V) + L * attn
    backward = 2 * (adapted * per_layer + d * V) + adapted * 2 * attn
    return forward + backward


def summarise(r: dict, warmup: int) -> dict:
    secs, toks = sum(r["step_s"][warmup:]), sum(r["tokens"][warmup:])
    per_step = [t / s for t, s in zip(r["tokens"][warmup:], r["step_s"][warmup:])]
    return {"tok_per_s": toks / secs, "step_s": secs / len(per_step), "tokens": toks,
            "min_tok_per_s": min(per_step), "max_tok_per_s": max(per_step), "peak_rss_gb": r["peak_rss_gb"],
            "peak_mem_gb": r.get("peak_mem_gb"), "first_loss": r["loss"][0], "last_loss": r["loss"][-1],
            "log": r.get("log", [])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["demo", "synthetic"], default=None,
                   help="default: demo on the CPU, synthetic on a GPU")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="--model synthetic's shape")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--steps", type=int, default=5, help="measured steps per way")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first steps per way (torch needs ~3)")
    p.add_argument("--layers", type=int, default=16, help="adapt the last N layers")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0, help="LoRA scale (peft lora_alpha = rank * scale)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on the CPU, 16 on a GPU")
    p.add_argument("--answer-copies", type=int, default=2, help="--model demo: join N hand-written answers")
    p.add_argument("--min-len", type=int, default=220, help="--model synthetic: shortest example")
    p.add_argument("--max-len", type=int, default=330, help="--model synthetic: longest example")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1))
    p.add_argument("--ways", default=None, help="comma-separated, of: " + ", ".join(WAYS) + " (default: "
                   "mlx,torch,mlx-plain,mlx-gc,mlx-epoch2, and on the CPU mlx-mkl,mlx-mkl-epoch2 and the "
                   "ablations mlx-head64,mlx-no-lossrows,mlx-no-chunkedhead,mlx-no-streams,mlx-no-flat)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; each way's best round counts")
    p.add_argument("--section", default=None, help="docs/benchmarks.md section (default: train, train-gpu)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--worker", choices=["matmul", "mlx", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--head-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "gpu"
    args.model = args.model or ("synthetic" if gpu else "demo")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch_size = args.batch_size or (16 if gpu else 4)
    args.ways = args.ways or "mlx,torch,mlx-plain,mlx-gc,mlx-epoch2" + (
        "" if gpu else ",mlx-mkl,mlx-mkl-epoch2,mlx-head64,mlx-no-lossrows,mlx-no-chunkedhead,mlx-no-streams,"
        "mlx-no-flat")
    if args.worker:
        return {"matmul": worker_matmul, "mlx": worker_mlx, "torch": worker_torch}[args.worker](args)

    import numpy as np
    from _benchlib import emit, write_section

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir, batches, info = (demo_batches if args.model == "demo" else synthetic_batches)(args, work)
    np.savez(work / "batches.npz", count=len(batches),
             **{f"{k}_{i}": a for i, b in enumerate(batches) for k, a in zip(("tokens", "lengths"), b)})
    widths = [b[0].shape[1] for b in batches]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    common = ["--batches", str(work / "batches.npz"), "--model-dir", model_dir, "--rank", str(args.rank),
              "--scale", str(args.scale), "--layers", str(args.layers), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = set(ways) - set(WAYS)
    if unknown:
        raise SystemExit(f"--ways: unknown {sorted(unknown)}; expected some of {', '.join(WAYS)}")
    from mlx_distill import _blas

    if _blas.mkl_path() is None and any(w.startswith("mlx-mkl") for w in ways):
        print("mkl is not installed (pip install --no-deps mkl==2026.2.0): skipping the mlx-mkl ways", flush=True)
        ways = [w for w in ways if not w.startswith("mlx-mkl")]
    load_before = os.getloadavg()[0]
    mm = ["--device", args.device, "--dtype", args.dtype]
    blas = run_worker("matmul", mm, env)
    bundled = None if gpu else run_worker("matmul", mm, {**env, "MLX_DISTILL_BLAS": "off"})
    rounds: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for way in ways if r % 2 == 0 else ways[::-1]:
            if way == "torch":
                res = run_worker("torch", common, env)
            else:
                extra = (["--epochs", "2"] if way.endswith("epoch2") else ["--grad-checkpoint"] if way == "mlx-gc"
                         else ["--head-rows", "64"] if way == "mlx-head64" else [])
                off = LEVERS_OFF if way == "mlx-plain" else (
                    dict([LEVER_ENV[way[len("mlx-no-"):]]]) if way.startswith("mlx-no-") else {})
                off = {**off, **MKL_ENV} if way.startswith("mlx-mkl") else off
                res = run_worker("mlx", common + extra, {**env, **off})
            s = summarise(res, args.warmup)
            rounds[way].append(s)
            print(f"round {r + 1} {way}: {s['tok_per_s']:.1f} tok/s, {s['step_s']:.2f} s/step, "
                  f"peak RSS {s['peak_rss_gb']:.2f} GB (framework peak {s['peak_mem_gb'] or 0:.2f} GB), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()[0]
    # The peak once more after the ways: one measurement can come out low on a shared machine (on the
    # 2-core AMD box the same worker gave 100-201 GFLOP/s in one day), and a low peak inflates every share.
    blas_after = run_worker("matmul", mm, env)
    best = {w: max(rs, key=lambda x: x["tok_per_s"]) for w, rs in rounds.items()}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fpt = flops_per_token(cfg, args.layers, sum(widths) / len(widths))
    # mlx-epoch2 skips the frozen layers' forward: its share counts only the work it does.
    fpt_of = {w: flops_per_token(cfg, args.layers, sum(widths) / len(widths), args.layers) if w.endswith("epoch2")
              else fpt for w in ways}
    peak = max(blas["gflops"], blas_after["gflops"])

    def ratio(a: str, b: str, key: str = "tok_per_s") -> float | None:
        if a in best and b in best and best[a].get(key) and best[b].get(key):
            return round(best[a][key] / best[b][key], 3)
        return None

    mem = "peak_mem_gb" if gpu else "peak_rss_gb"
    figures: dict = {
        "bench": "train", "device": args.device, "model": args.model, "dtype": args.dtype,
        **{f"{w.replace('-', '_')}_tok_per_s": round(s["tok_per_s"], 1) for w, s in best.items()},
        **{f"{w.replace('-', '_')}_{mem}": round(s[mem], 2) for w, s in best.items() if s.get(mem) is not None},
        **{f"{w.replace('-', '_')}_flops_share": round(s["tok_per_s"] * fpt_of[w] / 1e9 / peak, 3) for w, s in best.items()},
        "mlx_over_torch": ratio("mlx", "torch"), "plain_over_torch": ratio("mlx-plain", "torch"),
        "epoch2_over_torch": ratio("mlx-epoch2", "torch"),
        "mkl_over_torch": ratio("mlx-mkl", "torch"), "mkl_epoch2_over_torch": ratio("mlx-mkl-epoch2", "torch"),
        "mkl_speedup": ratio("mlx-mkl", "mlx"), "head256_over_head64": ratio("mlx", "mlx-head64"),
        "levers_speedup": ratio("mlx", "mlx-plain"),
        "mem_ratio_gc": ratio("mlx-gc", "torch", mem), "mem_ratio": ratio("mlx", "torch", mem),
        "matmul_gflops": round(peak, 1), "matmul_n": blas["n"],
        "matmul_gflops_runs": [round(blas["gflops"], 1), round(blas_after["gflops"], 1)],
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "rounds": args.rounds,
        "load_avg_before": round(load_before, 2), "load_avg_after": round(load_after, 2),
        "first_loss": {w: round(s["first_loss"], 4) for w, s in best.items()},
        "all_rounds_tok_per_s": {w: [round(x["tok_per_s"], 1) for x in rs] for w, rs in rounds.items()},
    }
    if bundled:
        figures.update(matmul_gflops_bundled=round(bundled["gflops"], 2),
                       openblas_speedup=round(peak / bundled["gflops"], 1))
    cores = args.threads
    figures["noisy"] = max(load_before, load_after) > cores
    targets = {"mlx_over_torch": 1.0, "mlx_flops_share": 0.6, "mem_ratio_gc": 0.4}
    figures["targets_met"] = {  # None: the ways that measure it did not run
        "tok_per_s >= 1.0x torch": None if figures["mlx_over_torch"] is None
        else figures["mlx_over_torch"] >= targets["mlx_over_torch"],
        "FLOP/s >= 60% of matmul peak": None if figures.get("mlx_flops_share") is None
        else figures["mlx_flops_share"] >= targets["mlx_flops_share"],
        "peak memory <= 0.4x torch (grad checkpointing)": None if figures["mem_ratio_gc"] is None
        else figures["mem_ratio_gc"] <= targets["mem_ratio_gc"],
    }
    lever_log = next((line for s in best.values() for line in s["log"] if line.startswith("CPU levers")), "")
    names = {"mlx": "MLX, mlx-distill trainer (CPU levers on)" if not gpu else "MLX (mlx[cuda]), mlx-distill trainer",
             "mlx-plain": "MLX, same trainer, CPU levers off", "mlx-gc": "MLX, levers on + --grad-checkpoint",
             "mlx-epoch2": "MLX, levers on, second epoch (frozen layers' output reused)",
             "mlx-mkl": "MLX, levers on, matmuls on MKL (`MLX_DISTILL_BLAS=mkl`)",
             "mlx-mkl-epoch2": "MLX, levers on, MKL, second epoch",
             "mlx-head64": "MLX, levers on, lm_head in 64-position chunks (the `--grad-checkpoint` size)",
             "torch": "torch + peft (eager)",
             **{f"mlx-no-{k}": f"MLX, levers on except {k} (`{e}={v}`)" for k, (e, v) in LEVER_ENV.items()}}
    unit = "GPU memory (peak allocated)" if gpu else "peak RSS (own process)"
    rows = "\n".join(
        f"| {names[w]} | {s['tok_per_s']:.1f} | {s['min_tok_per_s']:.1f}-{s['max_tok_per_s']:.1f} | "
        f"{s['step_s']:.2f} | {s[mem]:.2f} GB | {100 * s['tok_per_s'] * fpt_of[w] / 1e9 / peak:.0f}% | "
        f"{s['first_loss']:.4f} |" for w, s in best.items())
    measured = {"tok_per_s >= 1.0x torch": figures["mlx_over_torch"],
                "FLOP/s >= 60% of matmul peak": figures.get("mlx_flops_share"),
                "peak memory <= 0.4x torch (grad checkpointing)": figures["mem_ratio_gc"]}
    verdict = "; ".join(f"{k}: {'not measured' if measured[k] is None else 'met' if v else '**not met**'}"
                        for k, v in figures["targets_met"].items())
    parts = []
    if figures["mlx_over_torch"] is not None:
        parts.append(f"MLX / torch tokens/s: **{figures['mlx_over_torch']}x**")
    if figures["epoch2_over_torch"] is not None:
        parts.append(f"in the second epoch, with the frozen layers' output reused: {figures['epoch2_over_torch']}x")
    if figures["mkl_over_torch"] is not None:
        parts.append(f"with MLX_DISTILL_BLAS=mkl: {figures['mkl_over_torch']}x"
                     + (f", {figures['mkl_epoch2_over_torch']}x in the second epoch"
                        if figures["mkl_epoch2_over_torch"] is not None else ""))
    if figures["plain_over_torch"] is not None:
        parts.append(f"with the CPU levers off: {figures['plain_over_torch']}x")
    if figures["levers_speedup"] is not None:
        parts.append(f"the levers alone: {figures['levers_speedup']}x")
    if figures["head256_over_head64"] is not None:
        parts.append(f"the lm_head in 256- vs 64-position chunks: {figures['head256_over_head64']}x")
    if figures["mem_ratio_gc"] is not None:
        parts.append(f"memory with --grad-checkpoint / torch: {figures['mem_ratio_gc']}x")
    if figures["mem_ratio"] is not None:
        parts.append(f"memory without / torch: {figures['mem_ratio']}x")
    summary = "; ".join(parts) + "." if parts else ""
    warning = ("**Noisy run: the load average exceeded the core count, so the absolute figures are low and "
               "the ratios uncertain; rerun on an idle machine before quoting them.**\n\n" if figures["noisy"] else "")
    runs = " / ".join(f"{g:g}" for g in figures["matmul_gflops_runs"])
    blas_line = (f"MLX fp32 matmul, N=1024: **{peak:.1f} GFLOP/s with {blas['blas']}** (the better of a measurement "
                 f"before the ways and one after: {runs}; the FLOP shares are of it) vs {bundled['gflops']:.2f} with "
                 f"the bundled BLAS (`MLX_DISTILL_BLAS=off`): **{figures['openblas_speedup']:.0f}x** (target: "
                 "more than 20x).\n" if bundled else
                 f"MLX {args.dtype} matmul, N={blas['n']}: {peak / 1000:.1f} TFLOP/s (before / after the ways: {runs} "
                 "GFLOP/s).\n")
    second = [w for w in best if w.endswith("epoch2")]
    epoch2_flops = (f" ({' and '.join(second)}, whose forward skips the frozen layers: "
                    f"{fpt_of[second[0]] / 1e6:.0f} MFLOP)" if second else "")
    epoch2_note = (f" The {' and '.join(second)} row(s) are measured in their second epoch over the same batches "
                   "(the loss: that epoch's first step)." if second else "")
    body = warning + f"""
`scripts/bench_train.py --model {args.model} --device {args.device} --steps {args.steps} --warmup {args.warmup} --layers {args.layers} --rounds {args.rounds} --ways {",".join(ways)}`:
{'the demo student (SmolLM2-135M)' if args.model == 'demo' else f'a random-weight {args.shape} model'}, {args.dtype},
LoRA rank {args.rank} (scale {args.scale:g}; peft lora_alpha {args.rank * args.scale:g}) on the 7 linear modules of
the last {args.layers} of {cfg['num_hidden_layers']} layers, batch {args.batch_size}, Adam (bias-corrected) lr 1e-4,
{args.threads} threads. Every way replays the same {len(batches)} batches ({info['source']}, {info['tokens_min']}-{info['tokens_max']}
tokens; padded widths {sorted(set(widths))}); the first {args.warmup} steps of each are excluded; tokens/s counts
real (non-pad) tokens; best of {args.rounds} alternating round(s) (tok/s per round: {figures['all_rounds_tok_per_s']}).
{('MLX run log: `' + lever_log + '`.') if lever_log else ''}{epoch2_note}

| Way | tokens/s | per step, min-max | s/step | {unit} | FLOP/s share of matmul peak | loss of step 1 |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

{summary} Targets: {verdict}.

{blas_line}FLOPs per token ({fpt / 1e6:.0f} MFLOP) count the forward pass over every layer and the input-gradient
backward pass through the adapted layers and the lm_head; LoRA's own FLOPs are left out{epoch2_flops}.
The 1-minute load average was {load_before:.1f} before and {load_after:.1f} after this run on {os.cpu_count()} cores
(above the core count, the frameworks were slowed, not necessarily equally: torch's OpenMP threads
spin-wait and suffer most).
"""
    if not args.no_write:
        section = args.section or ("train" if not gpu else "train-gpu")
        title = ("LoRA training: MLX vs torch + peft (CPU)" if not gpu
                 else "LoRA training on a GPU: MLX (mlx[cuda]) vs torch + peft (CUDA)")
        write_section(section, title, body)
    print(body)
    emit(figures)


if __name__ == "__main__":
    main()
