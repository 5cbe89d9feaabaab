"""Process-level settings that make MLX training fast on a Linux CPU (none applies on Metal).

Measured on the 2-core x86 box of docs/benchmarks.md, one training step of
4 x 385 tokens on the 135M demo model (LoRA on 16 of 30 layers):

* :func:`tune_malloc` (opt-in, ``MLX_DISTILL_MALLOC=1``): MLX allocates every
  intermediate with ``malloc``; glibc mmaps arrays over 128 KB and unmaps
  them on free, so they page-fault back in (an 8M-element ``x + 1``: 2.5 ns an
  element before, 0.6-1.0 after). On a whole training step it measured within
  noise (84.5 vs 82.0 tok/s) and kept 1 GB more RSS (4.21 vs 3.17 GB), so it
  is off by default.
* :func:`native_cpu_jit`: ``mx.compile``'s fused elementwise kernels built for
  this CPU instead of 2003's SSE2 (the fast ops' exp chain: 4.0 -> 1.0 ns an
  element; the step: 19.4 -> 15.1 s of CPU).
* :func:`cpu_streams` (opt-in, ``MLX_DISTILL_CPU_STREAMS=2``): MLX 0.32 runs
  every elementwise op on one thread; only OpenBLAS matmuls use both cores.
  Splitting the batch's rows over one MLX CPU stream per core (each stream is
  its own thread; the work did split evenly between them) with one OpenBLAS
  thread per stream was meant to keep both cores busy for the whole step. It
  did not pay: 102.4 tok/s with 2 streams vs 105.6 with 1 (and 2 OpenBLAS
  threads) on a quiet machine, so it is off by default.

:func:`cpu_levers` applies all of them around a training run and undoes what
can be undone. Each has an opt-out environment variable.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from mlx_distill.training.fastops import fast_cpu_ops

MALLOC_ENV = "MLX_DISTILL_MALLOC"  # "1": tune glibc's malloc (off by default: more RSS, no measured gain)
NATIVE_ENV = "MLX_DISTILL_NATIVE_JIT"  # "0": keep MLX's own compiler flags
STREAMS_ENV = "MLX_DISTILL_CPU_STREAMS"  # a number > 1: MLX CPU streams per process (default 1: off)


def _off(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("0", "false", "off", "no")


def on_cpu() -> bool:
    """True when MLX computes on the CPU (``mx.default_device()``)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


# -- glibc malloc --------------------------------------------------------------------------------

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_malloc_state: dict[str, bool] = {}


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    The env form in FACTS.md (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...``) must be set before the
    process starts; ``mallopt`` does the same at run time for every later
    allocation. Peak RSS is unchanged, but the RSS after a peak stays there
    (freed memory is reused, not returned), so it is applied only for
    training, and only with ``MLX_DISTILL_MALLOC=1``. Once per process.
    Returns whether it applied.
    """
    if "done" in _malloc_state:
        return _malloc_state["done"]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get(MALLOC_ENV, "").strip().lower() in ("1", "true", "on"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 is
            # "never trim" (2**31 - 1 = 2 GB would still hand back a 4 GB step's memory).
            settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                        (_M_TOP_PAD, 256 << 20))
            ok = all(libc.mallopt(k, v) == 1 for k, v in settings)
        except (OSError, AttributeError):  # musl, or no libc.so.6: nothing to tune
            ok = False
    _malloc_state["done"] = ok
    return ok


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
    on = (on_cpu() if enabled is None else enabled) and not _off(NATIVE_ENV)
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


# -- OpenBLAS threads and MLX CPU streams ---------------------------------------------------------


def _openblas() -> Any:
    from mlx_distill import _blas

    path = _blas.preload()
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_num_threads()
        return lib
    except (OSError, AttributeError):
        return None


@contextmanager
def blas_threads(n: int) -> Iterator[int | None]:
    """OpenBLAS uses ``n`` threads within the block (restored after); yields the old count or None."""
    lib = _openblas()
    if lib is None:
        yield None
        return
    old = int(lib.openblas_get_num_threads())
    lib.openblas_set_num_threads(int(n))
    try:
        yield old
    finally:
        lib.openblas_set_num_threads(old)


def cpu_streams(rows: int, world: int = 1) -> int:
    """How many MLX CPU streams should share a batch of ``rows`` rows on this rank.

    1 (off) unless ``MLX_DISTILL_CPU_STREAMS`` asks for more: ``auto`` is one
    per core this rank may use (the cores divided by the local ranks), a
    number is that many; never more than the rows, and 1 off the CPU.
    4 rows on 2 cores with ``auto``: 2 streams of 2 rows each.
    """
    import mlx.core as mx

    asked = os.environ.get(STREAMS_ENV, "").strip().lower()
    if not asked or mx.default_device() != mx.cpu:
        return 1
    if asked == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(rows, cores // max(world, 1)))
    try:
        return max(1, min(int(asked), rows))
    except ValueError:
        return 1


@dataclass
class Levers:
    """What :func:`cpu_levers` applied (written to the training log)."""

    fast_ops: bool = False
    native_jit: bool = False
    malloc: bool = False
    streams: int = 1
    blas_threads: int | None = None

    def describe(self) -> str:
        on = [name for name, v in (("fast CPU ops", self.fast_ops), ("native JIT", self.native_jit),
                                   ("malloc tuning", self.malloc)) if v]
        if self.streams > 1:
            on.append(f"{self.streams} CPU streams x {self.blas_threads or 1} BLAS thread(s)")
        return ", ".join(on) if on else "none"


@contextmanager
def cpu_levers(model: Any, rows: int, world: int = 1, enabled: bool | None = None) -> Iterator[Levers]:
    """Apply every CPU lever for training ``model`` on batches of ``rows`` rows per rank.

    Off the CPU (Metal, CUDA) nothing is applied and mlx-lm's own path runs.
    Each lever also has its own switch: ``MLX_DISTILL_FAST_OPS``,
    ``MLX_DISTILL_NATIVE_JIT``, ``MLX_DISTILL_MALLOC`` (``0`` turns it off) and
    ``MLX_DISTILL_CPU_STREAMS`` (``1`` turns it off).
    """
    on = on_cpu() if enabled is None else enabled
    levers = Levers()
    with ExitStack() as stack:
        if on:
            levers.malloc = tune_malloc()
            levers.fast_ops = stack.enter_context(fast_cpu_ops(model))
            levers.native_jit = stack.enter_context(native_cpu_jit(enabled=True))
            levers.streams = cpu_streams(rows, world)
            if levers.streams > 1:
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                levers.blas_threads = max(1, cores // max(world, 1) // levers.streams)
                stack.enter_context(blas_threads(levers.blas_threads))
        yield levers
