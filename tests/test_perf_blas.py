"""The skinny-matmul BLAS dispatch: loaded when BLIS is there, same numbers as numpy either way."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS, and the dispatch shim)
import numpy as np
import pytest

from mlx_distill import _skinny_blas


def test_matmuls_of_every_row_count_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n, k in ((130, 96), (1100, 960)):  # a small and a big weight
        w = rng.standard_normal((n, k)).astype(np.float32)
        for m in (1, 8, 12, 13, 32, 200):  # both sides of the 12-row switch (and of the old 32)
            a = rng.standard_normal((m, k)).astype(np.float32)
            got = np.array(mx.array(a) @ mx.array(w).T)
            np.testing.assert_allclose(got, a @ w.T, rtol=1e-4, atol=2e-4, err_msg=f"{m} rows, {n}x{k}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_shim_is_loaded_when_blis_and_a_compiler_exist() -> None:
    if _skinny_blas.blis_path() is None:
        pytest.skip("no BLIS here (Debian: apt-get install libblis4-pthread)")
    path = _skinny_blas._state.get("path")
    if path is None:
        pytest.skip("no C compiler or no writable cache when mlx_distill was imported")
    maps = open("/proc/self/maps").read()
    assert path in maps
    x = mx.ones((4, 64)) @ mx.ones((64, 64))  # one skinny call: BLIS is loaded on first use
    mx.eval(x)
    assert "blis" in open("/proc/self/maps").read()


def test_it_can_be_turned_off() -> None:
    code = ("import mlx_distill, mlx.core as mx; from mlx_distill import _skinny_blas; "
            "mx.eval(mx.ones((2, 8)) @ mx.ones((8, 8))); "
            "print(_skinny_blas._state.get('path'), 'blis' in open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, _skinny_blas.ENV: "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_blis_runs_its_own_sgemm_not_openblas() -> None:
    """BLIS's cblas_sgemm calls ``sgemm_``; bound to OpenBLAS's global one, "BLIS" would be OpenBLAS."""
    if _skinny_blas.blis_path() is None or _skinny_blas._state.get("path") is None:
        pytest.skip("no BLIS shim here (Debian: apt-get install libblis4-pthread; needs a C compiler)")
    code = "import mlx_distill, mlx.core as mx; mx.eval(mx.ones((8, 576)) @ mx.ones((2048, 576)).T)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LD_DEBUG": "bindings"})
    assert out.returncode == 0, out.stderr[-2000:]
    blis = _skinny_blas.blis_path()
    sgemm = [line.split("binding file ", 1)[1] for line in out.stderr.splitlines()
             if f"binding file {blis} " in line and "symbol `sgemm_'" in line]
    assert sgemm, "BLIS's sgemm_ binding not seen (was BLIS loaded?)"
    assert all(f" to {blis} " in line for line in sgemm), sgemm
