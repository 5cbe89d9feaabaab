"""Make MLX use a fast BLAS on Linux before ``mlx.core`` is imported: OpenBLAS, or Intel MKL on request.

The ``mlx[cpu]`` wheel bundles a reference BLAS that runs fp32 matmul at about
4 GFLOP/s on a 2-core x86 box; Debian's OpenBLAS reaches 100-300 GFLOP/s on the
same machine (see docs/benchmarks.md). Loading a BLAS with RTLD_GLOBAL first
makes its ``cblas_sgemm`` win the symbol lookup when ``libmlx`` is loaded.

Intel MKL (the ``mkl`` wheel, Linux x86-64, ``pip install --no-deps
mkl==2026.2.0``) is opt-in: ``MLX_DISTILL_BLAS=mkl``. It runs on GNU OpenMP
(``MKL_THREADING_LAYER=GNU``, the system's ``libgomp.so.1``), so the wheel's
``intel-openmp`` and ``tbb`` dependencies are not needed. Measured on the
2-core box (2026-11-28): its matmuls of the training shapes ran 10-15% faster
than OpenBLAS 0.3.21 at one thread (706 x 576 @ 576 x 1536: 207 vs 181
GFLOP/s), the lm_head's 64-row chunks ~30% faster, and training 277.7 ->
298.9 and 277.9 -> 312.3 tok/s in two runs (``scripts/bench_train.py``). But MLX calls the BLAS from more
than one thread (each stream is a thread; generation runs on a stream of its
own), and then MKL's OpenMP teams fight over the cores: after a
``generate_batch`` a plain decode loop on the default stream took 352 ms a
step against 109 with OpenBLAS (``scripts/bench_cpu_ops.py``), and with torch in the same process
(transformers' generate) MLX's generation ran at 21 against 54 tok/s.
``OMP_WAIT_POLICY=PASSIVE`` made every step slow (349 ms), MKL's sequential
layer decoding slower than OpenBLAS (128 vs 100 ms). So it is not the
default; training alone (``mlx-distill train`` in its own process, where the
two CPU streams run MKL at one thread each) is where it paid, on that Intel
box: on a 2-core AMD EPYC box (2026-12-04) MKL trained slower than OpenBLAS
(192.0 vs 231.1 and 201.1 vs 223.5 tok/s).

OpenBLAS picks its kernels by the CPU's model (``DYNAMIC_ARCH``), and
0.3.21 does not know recent ones: on a 2-core Intel Xeon box of family 6,
model 207 (Emerald Rapids, AVX-512; 2026-12-05) it fell back to its
``Prescott`` (SSE3) kernels, 60-80 GFLOP/s for the training shapes against
290-370 with ``OPENBLAS_CORETYPE=SkylakeX``. So, unless ``OPENBLAS_CORETYPE``
is set, the core OpenBLAS detects is asked once per CPU (a child process;
cached next to the BLAS shim), and when it is one without AVX2 kernels on a
CPU that has AVX2 (AVX-512), ``OPENBLAS_CORETYPE`` is set to ``Haswell``
(``SkylakeX``) before OpenBLAS is loaded (:func:`coretype`).

``MLX_DISTILL_BLAS`` chooses: ``openblas`` (the default), ``mkl``, ``off``
(MLX's bundled BLAS) or a library path.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
MKL_PIN = "mkl==2026.2.0"
FIX = (
    "Install it with `sudo apt-get install -y libopenblas0-pthread` (Debian/Ubuntu), or on x86-64 "
    f"`pip install --no-deps {MKL_PIN}` and set MLX_DISTILL_BLAS=mkl, or point MLX_DISTILL_BLAS at a BLAS library"
)

_state: dict[str, object] = {"path": None, "warned": False}
# OpenBLAS's core names with AVX2 (or AVX-512) sgemm kernels; any other core on an x86 CPU with these flags
# is a fallback (0.3.21 on an unknown model: Prescott).
AVX2_CORES = ("haswell", "zen", "skylakex", "cooperlake", "sapphirerapids")
FORCED = (("SkylakeX", ("avx512f", "avx512dq", "avx512bw", "avx512vl")), ("Haswell", ("avx2", "fma")))
_PROBE = ("import ctypes, sys\nlib = ctypes.CDLL(sys.argv[1])\nf = lib.openblas_get_corename\n"
          "f.restype = ctypes.c_char_p\nprint(f().decode())")


def mkl_path() -> str | None:
    """``libmkl_rt`` from an installed ``mkl`` wheel whose OpenMP runtime (GNU) is on the system, or None."""
    import ctypes.util
    from importlib import metadata

    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None
    rt = [f for f in dist.files or [] if f.name.startswith("libmkl_rt.so")]
    path = os.path.realpath(str(dist.locate_file(rt[0]))) if rt else None
    if not path or not os.path.exists(path):
        return None
    # Without libgomp, MKL's GNU threading layer would exit the process at the first matmul.
    if os.environ.get("MKL_THREADING_LAYER", "GNU").upper() == "GNU" and not ctypes.util.find_library("gomp"):
        return None
    return path


def _candidates() -> list[str]:
    custom = os.environ.get("MLX_DISTILL_BLAS", "").strip()
    if custom.lower() == "mkl":
        mkl = mkl_path()
        return [mkl] if mkl else []
    if custom.lower() in ("", "openblas"):
        return list(OPENBLAS_CANDIDATES)
    return [custom]


def preload() -> str | None:
    """Load MKL or OpenBLAS globally on Linux; return its path, or None.

    Warns once when it cannot help: no BLAS found, or ``mlx.core`` was
    imported before this package (then the bundled BLAS is already bound).
    Set ``MLX_DISTILL_BLAS=off`` to skip.
    """
    if not sys.platform.startswith("linux") or _state["path"]:
        return _state["path"]  # type: ignore[return-value]
    if os.environ.get("MLX_DISTILL_BLAS", "").lower() == "off":
        return None
    # Loaded too late to matter (measured: 5 GFLOP/s after a late load), unless it was
    # already mapped before mlx.core (LD_PRELOAD).
    late = "mlx.core" in sys.modules and not blas_active()
    for path in _candidates():
        if os.path.exists(path):
            if "libmkl" in os.path.basename(path):
                # GNU OpenMP (libgomp) instead of the intel-openmp wheel; 32-bit ints as MLX passes them.
                os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
                os.environ.setdefault("MKL_INTERFACE_LAYER", "LP64")
                if os.environ["MKL_THREADING_LAYER"].upper() == "GNU":
                    try:
                        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_GLOBAL)
                    except OSError:
                        continue
            elif not late and "openblas" in path:  # skinny matmuls (decoding) to BLIS: see _skinny_blas
                from mlx_distill import _skinny_blas

                coretype(path)
                _skinny_blas.load(path)
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            _state["path"] = path
            if late:
                _warn(
                    "mlx.core was imported before mlx_distill, so MLX kept its bundled "
                    "reference BLAS (about 30x slower fp32 matmul). Import mlx_distill "
                    f"first, or run with LD_PRELOAD={path}"
                )
            return path
    what = "MKL (MLX_DISTILL_BLAS=mkl)" if os.environ.get("MLX_DISTILL_BLAS", "").strip().lower() == "mkl" else "OpenBLAS"
    _warn(f"{what} was not found, so MLX on this Linux CPU uses its bundled reference BLAS (about 30x slower fp32 matmul). {FIX}.")
    return None


def coretype(path: str) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` when OpenBLAS at ``path`` would fall back to kernels below the CPU's; return it.

    Nothing when the variable is set already, off x86, or when the child
    process that asks OpenBLAS cannot run. The answer is cached per library
    (path, size, mtime) and CPU under ``$MLX_DISTILL_HOME/blas``.
    """
    import hashlib
    import platform
    import subprocess

    from mlx_distill import _skinny_blas

    if "OPENBLAS_CORETYPE" in os.environ or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cpu = _skinny_blas._cpu()
    flags = set(next((x.split(":", 1)[1].split() for x in cpu.split("|") if x.startswith("flags")), []))
    want = next((name for name, needed in FORCED if flags.issuperset(needed)), None)
    if want is None:
        return None
    try:
        from mlx_distill.runs import home

        real = os.path.realpath(path)
        st = os.stat(real)  # a library upgraded in place is asked again
        key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}|{cpu}".encode()).hexdigest()[:16]
        cached = home() / "blas" / f"coretype-{key}.txt"
        if cached.is_file():
            detected = cached.read_text().strip()
        else:
            res = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
            detected = res.stdout.strip()
            if res.returncode != 0 or not detected:
                return None
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(detected)
            os.replace(tmp, cached)
    except (OSError, subprocess.SubprocessError):
        return None
    if detected.lower() in AVX2_CORES:
        return None
    os.environ["OPENBLAS_CORETYPE"] = want
    return want


def _mapped(*needles: str) -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any(n in line for line in f for n in needles)
    except OSError:
        return False


def openblas_active() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    return _mapped("openblas")


def mkl_active() -> bool:
    """True when MKL's runtime library (``libmkl_rt``) is mapped into this process."""
    return _mapped("libmkl_rt.so")


def blas_active() -> bool:
    """True when MKL or OpenBLAS is mapped into this process."""
    return _mapped("openblas", "libmkl_rt.so")


def kind() -> str:
    """``"mkl"``, ``"openblas"`` or ``"bundled"``: which BLAS MLX's matmuls run on."""
    return "mkl" if mkl_active() else "openblas" if openblas_active() else "bundled"


def get_threads() -> int | None:
    """The loaded BLAS's thread count (MKL or OpenBLAS), or None."""
    try:
        lib = ctypes.CDLL(None)
        if mkl_active():
            return int(lib.MKL_Get_Max_Threads())
        if openblas_active():
            return int(lib.openblas_get_num_threads())
    except (AttributeError, OSError):
        pass
    return None


def set_threads(n: int | None) -> int | None:
    """Set the loaded BLAS's thread count (MKL or OpenBLAS); return the previous one, or None."""
    before = get_threads()
    if n is None or before is None:
        return None
    lib = ctypes.CDLL(None)
    if mkl_active():
        lib.MKL_Set_Num_Threads(ctypes.c_int(n))  # the C API (mkl_set_num_threads is Fortran's, by pointer)
    else:
        lib.openblas_set_num_threads(ctypes.c_int(n))
    return before


def _warn(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
