"""The BLAS under MLX: MKL or OpenBLAS (+ the skinny-matmul BLIS shim), same numbers as numpy either way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_distill import _blas, _skinny_blas

CHECK = """
import mlx_distill, mlx_distill._blas as b, mlx_distill._skinny_blas as s, mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
for n, k in ((130, 96), (1100, 960)):  # a small and a big weight
    w = rng.standard_normal((n, k)).astype(np.float32)
    for m in (1, 8, 12, 13, 32, 200):  # both sides of the shim's 12-row switch (and of the old 32)
        a = rng.standard_normal((m, k)).astype(np.float32)
        got = np.array(mx.array(a) @ mx.array(w).T)
        np.testing.assert_allclose(got, a @ w.T, rtol=1e-4, atol=2e-4, err_msg=f"{m} rows, {n}x{k}")
print(b.kind(), s._state.get("path"), "blis" in open("/proc/self/maps").read())
"""


def run(code: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.parametrize("choice", ["mkl", "openblas"])
def test_matmuls_of_every_row_count_match_numpy(choice: str) -> None:
    kind, shim, blis = run(CHECK, MLX_DISTILL_BLAS=choice)
    if kind != choice:
        pytest.skip(f"{choice} is not installed here")
    if choice == "mkl":  # the shim serves OpenBLAS only
        assert (shim, blis) == ("None", "False")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_with_openblas_the_shim_is_loaded_when_blis_and_a_compiler_exist() -> None:
    if _skinny_blas.blis_path() is None:
        pytest.skip("no BLIS here (Debian: apt-get install libblis4-pthread)")
    kind, shim, blis = run(CHECK, MLX_DISTILL_BLAS="openblas")
    if kind != "openblas":
        pytest.skip("no OpenBLAS here")
    if shim == "None":
        pytest.skip("no C compiler or no writable cache for the shim")
    assert blis == "True"  # the skinny calls above loaded BLIS


def test_it_can_be_turned_off() -> None:
    kind, shim, blis = run(CHECK, MLX_DISTILL_BLAS="openblas", **{_skinny_blas.ENV: "0"})
    if kind != "openblas":
        pytest.skip("no OpenBLAS here")
    assert (shim, blis) == ("None", "False")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_blis_runs_its_own_sgemm_not_openblas() -> None:
    """BLIS's cblas_sgemm calls ``sgemm_``; bound to OpenBLAS's global one, "BLIS" would be OpenBLAS."""
    blis = _skinny_blas.blis_path()
    if blis is None or not any(os.path.exists(p) for p in _blas.OPENBLAS_CANDIDATES):
        pytest.skip("no BLIS or no OpenBLAS here (Debian: apt-get install libblis4-pthread libopenblas0-pthread)")
    code = "import mlx_distill, mlx.core as mx; mx.eval(mx.ones((8, 576)) @ mx.ones((2048, 576)).T)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LD_DEBUG": "bindings", "MLX_DISTILL_BLAS": "openblas"})
    assert out.returncode == 0, out.stderr[-2000:]
    sgemm = [line.split("binding file ", 1)[1] for line in out.stderr.splitlines()
             if f"binding file {blis} " in line and "symbol `sgemm_'" in line]
    if not sgemm and "skinny-" not in out.stderr:
        pytest.skip("the shim was not built (no C compiler or no writable cache)")
    assert sgemm, "BLIS's sgemm_ binding not seen (was BLIS loaded?)"
    assert all(f" to {blis} " in line for line in sgemm), sgemm
