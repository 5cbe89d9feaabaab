"""MLX's skinny fp32 matmuls (a few rows: token-by-token decoding) to a kernel of our own or BLIS; the rest to OpenBLAS.

Why: decoding 8 sequences multiplies 8 rows by every weight matrix, so a
decode step reads all 538 MB of the demo model's fp32 weights and does little
arithmetic with them: its speed is how fast the weights stream from memory.
OpenBLAS 0.3.21 packs (copies) the whole weight matrix on every ``sgemm``
call (48% of the time of 8 rows by SmolLM2's 49,152-word lm_head was
``sgemm_incopy``). BLIS (Debian ``libblis4-pthread``) has unpacked kernels
for skinny shapes: on a 2-core Intel Xeon box (2026-11-28) the lm_head by
8 rows 15.8 -> 7.2 ms, 1536 x 1536 0.76 -> 0.51 ms, but 1536 x 576 0.30 ->
0.38 ms, and a whole decode step within +-10% either way. On a 2-core AMD
EPYC box (2026-12-04) the decode step's 211 matmuls through BLIS ran at
4-9 GB/s, while one core streams memory at ~17 GB/s (numpy's sum).

So the calls a Linear makes while decoding (row-major ``x @ w.T``, at most
:data:`KERNEL_ROWS` rows) go to a kernel of our own (``assets/skinny_blas.c``): each weight
row is read once for all rows of ``x`` (which stays in L1), two weight rows
at a time, 16 floats a vector (GCC vector extensions, built with
``-march=native``), the next rows prefetched 16 KB ahead (one thread out of
cache: 5.5 -> 9 GB/s), and the weight's rows split between the caller and
one helper thread per other core (the helpers spin ``SPIN_US`` after a job,
then sleep). On the AMD box the decode step's 211 matmuls took 36.7-37.4 ms
against 58.5-68.4 ms through BLIS (the same matmuls for one row, as many
bytes: 31.9 ms), the step 63.9-80.0 against 81.0-93.1 ms, and batched
generation ran 1.35-1.43x faster (``scripts/bench_cpu_ops.py``,
``scripts/bench_generate.py``). At 24 rows OpenBLAS's packed kernel was as
fast (decode step: 156 vs 154 ms); at 16 the two runs disagree (1.09x and
0.88x the better of OpenBLAS and BLIS), and 16 was kept. Other skinny
calls (attention's, LoRA's) go to BLIS when it is installed, since OpenBLAS
loses to it below ~12 rows; the rest to OpenBLAS. One more shape is taken: a few
rows by a small ``B`` that is not transposed (``n`` a multiple of 16 up to
256), which is attention's probabilities by the values cache, one row and head
a call (2,160 calls a decode step): 30 layers' one-query attention of 8 rows
over a 150-token cache took 10.8-12.3 ms against 14.2-15.1 with those calls
on BLIS, and the decode step 75.5-82.1 against 78.4-90.5 ms.

The same library holds the one-query attention of :mod:`mlx_distill.fastdecode`
(``mlx_distill_attend``, :func:`attend_fn`), on the same helper threads, and its
SwiGLU (``mlx_distill_swiglu``, :func:`swiglu_fn`, on the caller's thread).

How: MLX calls ``cblas_sgemm`` from whichever library defined it first in the
process. The shim (``assets/skinny_blas.c``) defines only ``cblas_sgemm``; it is compiled once (``gcc``,
cached under ``$MLX_DISTILL_HOME/blas`` and keyed by the CPU) and loaded with
``RTLD_GLOBAL`` just before OpenBLAS, and forwards every call it does not
take to BLIS or OpenBLAS (every other BLAS/LAPACK symbol is OpenBLAS's). BLIS
is loaded privately with ``RTLD_DEEPBIND`` and one thread per core: BLIS's
``cblas_sgemm`` calls its own ``sgemm_``, and without DEEPBIND that name
would bind to OpenBLAS's global one, so every "BLIS" call ran OpenBLAS
(as it did before 2026-11-28; ``tests/test_perf_blas.py`` checks the
binding). Without a C compiler nothing changes. Switches:
``MLX_DISTILL_SKINNY_BLAS=0`` (no shim), ``MLX_DISTILL_SKINNY_KERNEL=0``
(skinny calls to BLIS as before; ``1`` turns on a kernel built without
``-march=native``, which is off by default), ``MLX_DISTILL_SKINNY_ROWS`` (BLIS's row
limit), ``MLX_DISTILL_SKINNY_KERNEL_ROWS`` (the kernel's), ``MLX_DISTILL_SKINNY_THREADS``
and ``MLX_DISTILL_SKINNY_SPIN_US``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BLIS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4",
)
ENV = "MLX_DISTILL_SKINNY_BLAS"
DEFAULT_ROWS = 12  # calls with at most this many rows go to BLIS (MLX_DISTILL_SKINNY_ROWS overrides)
KERNEL_ROWS = 16  # Linear calls with at most this many rows go to the own kernel (MLX_DISTILL_SKINNY_KERNEL_ROWS)
SPIN_US = 100  # a helper thread spins this long after a job before it sleeps (MLX_DISTILL_SKINNY_SPIN_US)
PREFETCH = 4096  # floats ahead of the weight rows being read (16 KB)

SOURCE = (Path(__file__).with_name("assets") / "skinny_blas.c").read_text()  # the C shim


_state: dict[str, str | None] = {}


def blis_path() -> str | None:
    """The first BLIS library found, or None."""
    return next((p for p in BLIS_CANDIDATES if os.path.exists(p)), None)


def load(openblas: str) -> str | None:
    """Build (once) and load the dispatching shim before ``openblas`` is loaded; return its path or None.

    Must run before ``mlx.core`` is imported and before ``openblas`` is loaded
    with ``RTLD_GLOBAL``, so that the shim's ``cblas_sgemm`` is found first.
    """
    if "path" in _state:
        return _state["path"]
    _state["path"] = None
    small = blis_path() or ""
    cc = shutil.which("gcc") or shutil.which("cc")
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no") or not cc:
        return None
    defines = [f'-DBIG_PATH="{openblas}"', f'-DSMALL_PATH="{small}"', f"-DDEFAULT_ROWS={DEFAULT_ROWS}", f"-DKERNEL_ROWS={KERNEL_ROWS}",
               f"-DSPIN_US={SPIN_US}", f"-DPREFETCH={PREFETCH}"]
    # -march=native: the kernel is built on the machine that runs it; the key names the CPU, so a cache
    # shared between machines (a network home) builds one library per CPU.
    key = hashlib.sha256("|".join([SOURCE, *defines, cc, _cpu()]).encode()).hexdigest()[:16]
    try:
        from mlx_distill.runs import home

        out = home() / "blas" / f"skinny-{key}.so"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                src = Path(tmp) / "skinny.c"
                src.write_text(SOURCE)
                built = Path(tmp) / "skinny.so"
                # Without -march=native the kernel is built for the baseline ISA (SSE2 on x86-64: the lm_head by
                # 8 rows 68 ms against BLIS's 11), so then it is off unless MLX_DISTILL_SKINNY_KERNEL=1.
                for flags in (["-O3", "-march=native", "-DKERNEL_ON=1"], ["-O3", "-DKERNEL_ON=0"]):
                    res = subprocess.run([cc, *flags, "-shared", "-fPIC", *defines, str(src), "-o", str(built),
                                          "-ldl", "-lpthread"], capture_output=True, timeout=120)
                    if res.returncode == 0:
                        break
                res.check_returncode()
                os.replace(built, out)
        ctypes.CDLL(str(out), mode=os.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError):
        return None  # no writable cache or no working compiler: plain OpenBLAS
    _state["path"] = str(out)
    return _state["path"]


_libs: dict[str, ctypes.CDLL] = {}


def _lib() -> ctypes.CDLL | None:
    path = _state.get("path")
    if not path:
        return None
    if path not in _libs:
        _libs[path] = ctypes.CDLL(path)
    return _libs[path]


def _native_fn(name: str, restype: type | None, argtypes: list[type]) -> ctypes._CFuncPtr | None:
    """The shim's function ``name``; None without the shim, or when it was built without ``-march=native``."""
    lib = _lib()
    if lib is None or not lib.mlx_distill_skinny_native():
        return None
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


def attend_fn() -> ctypes._CFuncPtr | None:
    """The shim's one-query attention (``mlx_distill_attend``, for :mod:`mlx_distill.fastdecode`), or None."""
    return _native_fn("mlx_distill_attend", ctypes.c_int,
                      [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 10)


def swiglu_fn() -> ctypes._CFuncPtr | None:
    """The shim's ``silu(gate) * up`` (``mlx_distill_swiglu``, for :mod:`mlx_distill.fastdecode`), or None."""
    return _native_fn("mlx_distill_swiglu", None, [ctypes.c_long] + [ctypes.c_void_p] * 3)


def set_kernel(on: bool) -> bool | None:
    """Send the skinny calls to the own kernel (True) or to BLIS/OpenBLAS as before (False).

    Returns the previous setting, or None when the shim is not loaded. For
    in-process comparisons (``scripts/bench_generate.py``) and tests; the
    environment's ``MLX_DISTILL_SKINNY_KERNEL=0`` sets it at start-up.
    """
    lib = _lib()
    return None if lib is None else bool(lib.mlx_distill_skinny_set_kernel(int(on)))


def set_spin(us: int) -> int | None:
    """How long the helper threads spin after a job before they sleep (µs); returns the old value, or None."""
    lib = _lib()
    if lib is None:
        return None
    lib.mlx_distill_skinny_set_spin.restype = ctypes.c_long
    lib.mlx_distill_skinny_set_spin.argtypes = [ctypes.c_long]
    return int(lib.mlx_distill_skinny_set_spin(int(us)))


def kernel_calls() -> int | None:
    """How many matmuls the own kernel has taken in this process (None without the shim)."""
    lib = _lib()
    return None if lib is None else ctypes.c_long.in_dll(lib, "mlx_distill_skinny_calls").value


def _cpu() -> str:
    """The CPU's model and feature flags (Linux), for the build cache's key."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "|".join(sorted({x for x in info if x.split(":")[0].strip() in ("model name", "flags", "Features")}))
