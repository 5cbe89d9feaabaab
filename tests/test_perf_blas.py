"""The BLAS under MLX: MKL or OpenBLAS (+ the skinny-matmul BLIS shim), same numbers as numpy either way."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_distill import _blas, _skinny_blas

ROWS = (1, 8, 12, 13, 32, 33, 200)
CHECK = f"ROWS = {ROWS!r}\n" + """
import mlx_distill, mlx_distill._blas as b, mlx_distill._skinny_blas as s, mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
for n, k in ((130, 96), (1100, 960), (131, 100)):  # small, big, and odd (a tail in both n and k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    for m in ROWS:  # both sides of the 12-row switch to BLIS, the 16-row one to the own kernel, the old 32
        a = rng.standard_normal((m, k)).astype(np.float32)
        got = np.array(mx.array(a) @ mx.array(w).T)
        np.testing.assert_allclose(got, a @ w.T, rtol=1e-4, atol=2e-4, err_msg=f"{m} rows, {n}x{k}")
print(b.kind(), s._state.get("path"), "blis" in open("/proc/self/maps").read(), s.kernel_calls())
"""


def run(code: str, **env: str) -> list[str]:
    """Run ``code`` in a fresh Python with the shim's switches at their defaults unless given in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLX_DISTILL_SKINNY_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.parametrize("choice", ["mkl", "openblas"])
def test_matmuls_of_every_row_count_match_numpy(choice: str) -> None:
    kind, shim, blis, _ = run(CHECK, MLX_DISTILL_BLAS=choice)
    if kind != choice:
        pytest.skip(f"{choice} is not installed here")
    if choice == "mkl":  # the shim serves OpenBLAS only
        assert (shim, blis) == ("None", "False")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_with_openblas_the_shim_sends_the_skinny_calls_to_its_kernel() -> None:
    kind, shim, blis, calls = run(CHECK, MLX_DISTILL_BLAS="openblas")
    if kind != "openblas":
        pytest.skip("no OpenBLAS here")
    if shim == "None":
        pytest.skip("no C compiler or no writable cache for the shim")
    # Each of the three weights by every row count up to KERNEL_ROWS; the rest to OpenBLAS.
    assert int(calls) == 3 * sum(m <= _skinny_blas.KERNEL_ROWS for m in ROWS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_with_the_kernel_off_the_skinny_calls_go_to_blis() -> None:
    if _skinny_blas.blis_path() is None:
        pytest.skip("no BLIS here (Debian: apt-get install libblis4-pthread)")
    kind, shim, blis, calls = run(CHECK, MLX_DISTILL_BLAS="openblas", MLX_DISTILL_SKINNY_KERNEL="0")
    if kind != "openblas":
        pytest.skip("no OpenBLAS here")
    if shim == "None":
        pytest.skip("no C compiler or no writable cache for the shim")
    assert (blis, calls) == ("True", "0")  # the skinny calls above loaded BLIS


def test_it_can_be_turned_off() -> None:
    kind, shim, blis, calls = run(CHECK, MLX_DISTILL_BLAS="openblas", **{_skinny_blas.ENV: "0"})
    if kind != "openblas":
        pytest.skip("no OpenBLAS here")
    assert (shim, blis, calls) == ("None", "False", "None")


def _shim() -> ctypes.CDLL:
    path = _skinny_blas._state.get("path")
    if not path:
        pytest.skip("the shim is not loaded here (no OpenBLAS, no C compiler or MLX_DISTILL_SKINNY_BLAS=0)")
    if not _skinny_blas.set_kernel(True):
        _skinny_blas.set_kernel(False)
        pytest.skip("the kernel is off in this process (MLX_DISTILL_SKINNY_KERNEL=0, or built without -march=native)")
    lib = ctypes.CDLL(path)
    lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                                     ctypes.c_void_p, ctypes.c_int]
    return lib


def _sgemm(lib: ctypes.CDLL, a: np.ndarray, w: np.ndarray, c: np.ndarray, m: int, n: int, k: int,
           alpha: float = 1.0, beta: float = 0.0) -> None:
    """Row-major ``c[:m, :n] = alpha * a[:m, :k] @ w[:n, :k].T + beta * c``, as MLX calls it for ``x @ w.T``."""
    lib.cblas_sgemm(101, 111, 112, m, n, k, alpha, a.ctypes.data, a.shape[1], w.ctypes.data, w.shape[1], beta,
                    c.ctypes.data, c.shape[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_kernel_matches_numpy_for_every_row_count_tail_stride_alpha_and_beta() -> None:
    lib = _shim()
    rng = np.random.default_rng(1)
    before = _skinny_blas.kernel_calls()
    done = 0
    for n, k in ((1, 16), (7, 33), (600, 576), (1537, 95)):  # n over 2 x 256 splits between the threads
        for m in (*range(1, 14), 16):  # up to KERNEL_ROWS (16), in equal groups of at most 12 (13: 7 + 6, 16: 8 + 8)
            # Strided: rows of a, w and c longer than k and n (MLX passes lda, ldb, ldc).
            a = rng.standard_normal((m, k + 5)).astype(np.float32)
            w = rng.standard_normal((n, k + 3)).astype(np.float32)
            for alpha, beta in ((1.0, 0.0), (0.5, 2.0)):
                c = rng.standard_normal((m, n + 2)).astype(np.float32)
                want = alpha * (a[:, :k] @ w[:, :k].T) + beta * c[:, :n]
                edge = c[:, n:].copy()
                _sgemm(lib, a, w, c, m, n, k, alpha, beta)
                done += 1
                np.testing.assert_allclose(c[:, :n], want, rtol=1e-4, atol=1e-3, err_msg=f"{m}x{k} @ {n}x{k}")
                np.testing.assert_array_equal(c[:, n:], edge)  # nothing written past n
    assert _skinny_blas.kernel_calls() - before == done


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_not_transposed_path_matches_numpy_and_leaves_other_shapes_to_blas() -> None:
    """Attention's probabilities @ values while decoding: a few rows by B (k x n), n a multiple of 16 up to 256."""
    lib = _shim()
    rng = np.random.default_rng(4)
    before, done = _skinny_blas.kernel_calls(), 0
    for m, k, n in ((1, 102, 64), (3, 7, 16), (16, 300, 256), (2, 1, 128), (1, 64, 8), (4, 64, 272), (17, 8, 64)):
        a = rng.standard_normal((m, k + 2)).astype(np.float32)
        b = rng.standard_normal((k, n + 5)).astype(np.float32)
        for alpha, beta in ((1.0, 0.0), (0.5, 2.0)):
            c = rng.standard_normal((m, n + 3)).astype(np.float32)
            want = alpha * (a[:, :k] @ b[:, :n]) + beta * c[:, :n]
            edge = c[:, n:].copy()
            lib.cblas_sgemm(101, 111, 111, m, n, k, alpha, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], beta,
                            c.ctypes.data, c.shape[1])
            np.testing.assert_allclose(c[:, :n], want, rtol=1e-4, atol=1e-3, err_msg=f"{m}x{k} @ {k}x{n}")
            np.testing.assert_array_equal(c[:, n:], edge)
            done += n % 16 == 0 and n <= 256 and m <= _skinny_blas.KERNEL_ROWS  # the rest went to BLIS / OpenBLAS
    assert _skinny_blas.kernel_calls() - before == done == 8


FORKED = """
import os, signal, sys
import numpy as np
import mlx_distill, mlx_distill._skinny_blas as s
sys.path.insert(0, {tests!r})
from test_perf_blas import _sgemm, _shim
lib = _shim()
rng = np.random.default_rng(2)
a, w = rng.standard_normal((8, 576)).astype(np.float32), rng.standard_normal((4096, 576)).astype(np.float32)
c = np.zeros((8, 4096), np.float32)
_sgemm(lib, a, w, c, 8, 4096, 576)  # starts the helper threads (4096 rows are split)
pid = os.fork()
if pid == 0:  # the helpers do not exist here: a call that waited for them would hang
    signal.alarm(20)
    c[:] = 0
    _sgemm(lib, a, w, c, 8, 4096, 576)
    os._exit(0 if np.allclose(c, a @ w.T, rtol=1e-4, atol=1e-3) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_kernel_works_in_a_forked_child_after_its_threads_started() -> None:
    _shim()
    out = run(FORKED.format(tests=os.path.dirname(__file__)), MLX_DISTILL_BLAS="openblas",
              MLX_DISTILL_SKINNY_THREADS="2")
    assert out == ["0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_two_streams_calling_the_kernel_at_once_get_their_own_answers() -> None:
    """One caller at a time uses the helper threads; a second one (another MLX stream) runs its call alone."""
    _shim()
    import mlx.core as mx

    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((2048, 576)).astype(np.float32) for _ in range(2)]
    xs = [rng.standard_normal((8, 576)).astype(np.float32) for _ in range(2)]
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    for _ in range(20):
        outs = []
        for x, w, st in zip(xs, ws, streams):
            with mx.stream(st):
                y = mx.array(x)
                for _ in range(4):  # chained, so each stream keeps calling while the other does
                    y = (y @ mx.array(w).T)[:, :576] * 0.05
                outs.append(y)
        mx.eval(outs)
        for x, w, y in zip(xs, ws, outs):
            want = x
            for _ in range(4):
                want = (want @ w.T)[:, :576] * 0.05
            np.testing.assert_allclose(np.array(y), want, rtol=1e-3, atol=1e-4)


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_without_native_flags_the_kernel_is_built_but_off(tmp_path: Path) -> None:
    """A compiler that refuses -march=native: the portable build (SSE2: 6x slower than BLIS) leaves the kernel off."""
    _shim()
    real = shutil.which("gcc") or shutil.which("cc")
    fake = tmp_path / "bin" / "gcc"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec "{real}" "$@"\n')
    fake.chmod(0o755)
    env = {"MLX_DISTILL_BLAS": "openblas", "MLX_DISTILL_HOME": str(tmp_path / "home"),
           "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    kind, shim, _, calls = run(CHECK, **env)
    assert (kind, calls) == ("openblas", "0") and shim.startswith(str(tmp_path / "home"))
    _, _, _, calls = run(CHECK, MLX_DISTILL_SKINNY_KERNEL="1", **env)  # on request it still runs, and is right
    assert int(calls) > 0


def _fake_openblas(tmp_path: Path, core: str) -> str:
    """A library with only ``openblas_get_corename``, answering ``core`` (what coretype() asks a child process)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src, lib = tmp_path / f"{core}.c", tmp_path / f"lib{core}.so"
    src.write_text(f'char* openblas_get_corename(void) {{ return "{core}"; }}\n')
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=60)
    return str(lib)


AVX512 = "flags\t: fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl"


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 Linux")
def test_an_openblas_fallback_core_is_replaced_by_the_cpus_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBLAS 0.3.21 ran its Prescott (SSE3) kernels on an AVX-512 Xeon it did not know: 60-80 vs 290-370 GFLOP/s."""
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setenv("MLX_DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_skinny_blas, "_cpu", lambda: f"model name\t: Some Xeon|{AVX512}")
    prescott = _fake_openblas(tmp_path, "Prescott")
    assert _blas.coretype(prescott) == "SkylakeX" and os.environ["OPENBLAS_CORETYPE"] == "SkylakeX"
    cached = list((tmp_path / "home" / "blas").glob("coretype-*.txt"))
    assert [p.read_text() for p in cached] == ["Prescott"]  # asked once per library and CPU
    assert _blas.coretype(prescott) is None  # already set (by us or by the user): left alone
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert _blas.coretype(prescott) == "SkylakeX"  # from the cache this time
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert _blas.coretype(_fake_openblas(tmp_path, "Haswell")) is None  # a core with AVX2 kernels: kept
    assert "OPENBLAS_CORETYPE" not in os.environ
    monkeypatch.setattr(_skinny_blas, "_cpu", lambda: "flags\t: fpu sse2 avx fma avx2")
    assert _blas.coretype(_fake_openblas(tmp_path, "Nehalem")) == "Haswell"  # AVX2 without AVX-512
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.setattr(_skinny_blas, "_cpu", lambda: "flags\t: fpu sse2 sse4_2")
    assert _blas.coretype(_fake_openblas(tmp_path, "Core2")) is None  # nothing better to ask for
    monkeypatch.setattr(_skinny_blas, "_cpu", lambda: f"model name\t: Some Xeon|{AVX512}")
    not_a_library = tmp_path / "libnot.so"
    not_a_library.write_text("not ELF")
    assert _blas.coretype(str(not_a_library)) is None  # a child that fails: nothing set
    assert _blas.coretype(str(tmp_path / "missing.so")) is None
    assert "OPENBLAS_CORETYPE" not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 Linux")
def test_mlx_runs_on_openblas_kernels_with_the_cpus_vector_width(tmp_path: Path) -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    if "avx2" not in flags or _blas.kind() != "openblas":
        pytest.skip("no AVX2, or OpenBLAS is not the BLAS here")
    code = ("import ctypes, os, mlx_distill, mlx_distill._blas as b\n"
            "f = ctypes.CDLL(b._state['path']).openblas_get_corename\nf.restype = ctypes.c_char_p\n"
            "print(f().decode(), os.environ.get('OPENBLAS_CORETYPE', '-'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "MLX_DISTILL_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr[-2000:]
    core, forced = out.stdout.split()
    assert core.lower() in _blas.AVX2_CORES, (core, forced)
