"""Make MLX use the system OpenBLAS on Linux before ``mlx.core`` is imported.

The ``mlx[cpu]`` wheel bundles a reference BLAS that runs fp32 matmul at about
4 GFLOP/s on a 2-core x86 box; Debian's OpenBLAS reaches 100-300 GFLOP/s on the
same machine (see docs/benchmarks.md). Loading OpenBLAS with RTLD_GLOBAL first
makes its ``sgemm`` win the symbol lookup when ``libmlx`` is loaded.
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
FIX = (
    "Install it with `sudo apt-get install -y libopenblas0-pthread` (Debian/Ubuntu) "
    "or point MLX_DISTILL_BLAS at an OpenBLAS libblas.so"
)

_state: dict[str, object] = {"path": None, "warned": False}


def _candidates() -> list[str]:
    custom = os.environ.get("MLX_DISTILL_BLAS")
    return [custom] if custom else list(OPENBLAS_CANDIDATES)


def preload() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None.

    Warns once when it cannot help: no OpenBLAS found, or ``mlx.core`` was
    imported before this package (then the bundled BLAS is already bound).
    Set ``MLX_DISTILL_BLAS=off`` to skip.
    """
    if not sys.platform.startswith("linux") or _state["path"]:
        return _state["path"]  # type: ignore[return-value]
    if os.environ.get("MLX_DISTILL_BLAS", "").lower() == "off":
        return None
    # Loaded too late to matter (measured: 5 GFLOP/s after a late load), unless it was
    # already mapped before mlx.core (LD_PRELOAD).
    late = "mlx.core" in sys.modules and not openblas_active()
    for path in _candidates():
        if os.path.exists(path):
            if not late and "openblas" in path:  # skinny matmuls (decoding) to BLIS: see _skinny_blas
                from mlx_distill import _skinny_blas

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
    _warn(f"OpenBLAS was not found, so MLX on this Linux CPU uses its bundled reference BLAS (about 30x slower fp32 matmul). {FIX}.")
    return None


def openblas_active() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any("openblas" in line or "/openblas-pthread/" in line for line in f)
    except OSError:
        return False


def _warn(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
