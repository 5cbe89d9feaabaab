"""Process-level settings that make MLX training fast on a Linux CPU (none applies on Metal).

Measured on the 2-core x86 box of docs/benchmarks.md, one training step of
4 x 385 tokens on the 135M demo model (LoRA on 16 of 30 layers):

* :func:`native_cpu_jit`: ``mx.compile``'s fused elementwise kernels built for
  this CPU instead of 2003's SSE2 (the fast ops' exp chain: 4.0 -> 1.0 ns an
  element; the step: 19.4 -> 15.1 s of CPU).
* ``fastops.fast_cpu_ops``: the multiply-add exp and fused losses.
* ``headce.chunked_head``: the lm_head + cross-entropy in chunks of
  ``headce.CHUNK_ROWS`` = 256 positions (64 under ``--grad-checkpoint``),
  each chunk's gradient made in its forward pass (at 64 rows: peak RSS
  3.22 -> 2.38 GB, 172.3 -> 272.4 tok/s against whole logits, 2026-11-28;
  256 rows: 1.03-1.22x faster than 64, +0.2 GB).
* ``headce.loss_rows``: that head over the loss positions only (not the
  prompt's or the padding's), a step compiled per count rounded up to 256
  (``bench_train.py`` way ``mlx-no-lossrows``, 2026-11-28: 191.2 -> 223.2
  tok/s; by hand, the same compiled steps called alternately: 1.05-1.07x;
  ~1 s to compile a new count).
* ``streams.two_streams``: each half of the batch on its own MLX CPU stream
  (thread), OpenBLAS at half the cores meanwhile (217.5 -> 272.4 tok/s), the
  second stream's elementwise chains on 1-D views (``fastops.flat_on_second``:
  otherwise compiled as unvectorized strided loops; 2026-12-04 on a 2-core AMD
  EPYC box, 194.1 / 198.2 / 209.6 -> 205.8 / 221.8 / 230.4 tok/s).

Tried and removed (docs/benchmarks.md, "Performance levers"): glibc malloc
tuning with ``mallopt`` (84.5 vs 82.0 tok/s, within noise, and 1 GB more RSS);
a larger MLX CPU buffer cache (no faster, 0.4-1.5 GB more RSS);
two streams with the whole model called once per half (no overlap: 225.0 ->
195.5 tok/s) and half of each attention softmax on a second stream (197.3 ->
187.9 tok/s).

:func:`cpu_levers` applies them around a training run and undoes them after.
Each has an opt-out environment variable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from mlx_distill.training.fastops import env_off, fast_cpu_ops
from mlx_distill.training.headce import LOSS_ROWS_ENV
from mlx_distill.training.streams import two_streams

NATIVE_ENV = "MLX_DISTILL_NATIVE_JIT"  # "0": keep MLX's own compiler flags
CHUNKED_HEAD_ENV = "MLX_DISTILL_CHUNKED_HEAD"  # "0": whole logits unless --grad-checkpoint


def on_cpu() -> bool:
    """True when MLX computes on the CPU (``mx.default_device()``)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


# -- native flags for MLX's CPU JIT --------------------------------------------------------------


def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@contextmanager
def native_cpu_jit(enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, ``mx.compile`` builds its fused CPU kernels with ``-march=native``.

    MLX 0.32 JIT-compiles each fused elementwise kernel with ``g++ -std=c++17
    -O3`` found on ``PATH``, so on x86 it targets the SSE2 baseline (4 floats
    a vector; ``fma`` and ``floor`` become libm calls). MLX reads neither
    flags nor a compiler from the environment, so this puts a one-line
    ``g++`` wrapper that adds ``-march=native`` first on ``PATH``, and points
    ``TMPDIR`` (where MLX caches built kernels, as ``$TMPDIR/mlx/<version>/cpu``)
    at a cache of its own keyed by CPU model, flags, compiler and MLX version:
    kernels built for this CPU are never loaded on another one, and they
    survive across runs (a first run spends ~1 s per new kernel, ~60 s for a
    training step's worth). Both variables are restored on exit. Linux x86-64
    with AVX2 and FMA only; ``MLX_DISTILL_NATIVE_JIT=0`` turns it off.
    Yields whether it applied.
    """
    on = (on_cpu() if enabled is None else enabled) and not env_off(NATIVE_ENV)
    real = shutil.which("g++") if on else None
    flags = set(_cpuinfo("flags").split())
    if not (on and real and sys.platform.startswith("linux") and {"avx2", "fma"} <= flags):
        yield False
        return
    import tempfile

    import mlx.core as mx

    from mlx_distill.runs import home

    key = hashlib.sha256(f"{_cpuinfo('model name')}|{sorted(flags)}|{real}|{mx.__version__}".encode())
    root = home() / "jit" / key.hexdigest()[:12]
    shim = root / "bin" / "g++"
    script = f'#!/bin/sh\nexec "{real}" -march=native "$@"\n'
    try:
        if not shim.is_file() or shim.read_text() != script:
            shim.parent.mkdir(parents=True, exist_ok=True)
            tmp = shim.with_name(f".g++.{os.getpid()}")
            tmp.write_text(script)
            tmp.chmod(0o755)
            os.replace(tmp, shim)
        (root / "tmp").mkdir(exist_ok=True)
    except OSError:  # a read-only cache: keep MLX's defaults
        yield False
        return
    tempfile.gettempdir()  # Python caches its own temp dir now, before TMPDIR changes
    saved = {k: os.environ.get(k) for k in ("PATH", "TMPDIR")}
    os.environ["PATH"] = f"{shim.parent}{os.pathsep}{saved['PATH'] or ''}"
    os.environ["TMPDIR"] = str(root / "tmp")
    try:
        yield True
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Levers:
    """What :func:`cpu_levers` applied (written to the training log)."""

    fast_ops: bool = False
    native_jit: bool = False
    chunked_head: bool = False
    two_streams: bool = False
    blas: str = ""  # which BLAS the matmuls run on ("mkl", "openblas"; see mlx_distill._blas)

    def describe(self) -> str:
        head = "chunked lm_head" + ("" if env_off(LOSS_ROWS_ENV) else " over the loss positions")
        on = [name for name, v in (("fast CPU ops", self.fast_ops), ("native JIT", self.native_jit),
                                   (head, self.chunked_head),
                                   ("batch halves on two CPU streams", self.two_streams)) if v]
        return (", ".join(on) if on else "none") + (f"; matmuls on {self.blas}" if self.blas else "")


@contextmanager
def cpu_levers(model: Any, enabled: bool | None = None) -> Iterator[Levers]:
    """Apply every CPU lever for training ``model``; undone on exit.

    Off the CPU (Metal, CUDA) nothing is applied and mlx-lm's own path runs.
    Each lever also has its own switch: ``MLX_DISTILL_FAST_OPS=0``,
    ``MLX_DISTILL_NATIVE_JIT=0``, ``MLX_DISTILL_CHUNKED_HEAD=0``,
    ``MLX_DISTILL_LOSS_ROWS=0`` (the head over every position),
    ``MLX_DISTILL_CPU_STREAMS=0`` and ``MLX_DISTILL_FLAT_SECOND=0`` (the second
    stream's ops keep their shapes) turn it off.
    """
    from mlx_distill.training import headce

    on = on_cpu() if enabled is None else enabled
    levers = Levers()
    with ExitStack() as stack:
        if on:
            from mlx_distill import _blas

            levers.blas = _blas.kind()
            levers.fast_ops = stack.enter_context(fast_cpu_ops(model))
            levers.native_jit = stack.enter_context(native_cpu_jit(enabled=True))
            if not env_off(CHUNKED_HEAD_ENV) and headce.head_of(model) is not None:
                if headce.head_chunk_rows() is None:  # --grad-checkpoint may have set it already
                    stack.enter_context(headce.chunked_head(headce.CHUNK_ROWS))
                levers.chunked_head = True
            if levers.fast_ops:
                levers.two_streams = stack.enter_context(two_streams(model))
        yield levers
