"""Send MLX's skinny fp32 matmuls (a few rows: token-by-token decoding) to BLIS, the rest to OpenBLAS.

Why: OpenBLAS 0.3.21 packs (copies) the whole weight matrix on every
``sgemm`` call. Decoding 8 sequences multiplies 8 rows by every weight
matrix, so for a big matrix the copy costs more than the multiply: in a perf
profile of 8 rows by SmolLM2's 49,152-word lm_head, 48% of the time was
``sgemm_incopy``. BLIS (Debian ``libblis4-pthread``) has unpacked kernels
for skinny shapes. Measured on this 2-core box (2026-11-28, ms per call,
OpenBLAS -> BLIS, 8 rows): by the 49,152 x 576 lm_head 15.8 -> 7.2; by
1536 x 1536 0.76 -> 0.51; by 1536 x 576 0.30 -> 0.38 (small weights:
OpenBLAS is faster alone). In the decode loop (embedded model, 8 prompts,
160 tokens, two rounds) all skinny calls to BLIS gave 58.2 and 58.0 tok/s
on 27.7 CPU-seconds, only the big weights to BLIS 57.0 and 53.7 tok/s,
none 57.4 and 55.9 tok/s on 40.6 CPU-seconds: between calls OpenBLAS's idle
threads spin, BLIS's sleep. So every call with at most
``MLX_DISTILL_SKINNY_ROWS`` rows (:data:`DEFAULT_ROWS` = 12) goes to BLIS.
Past that BLIS loses: one decode step of the demo model (``bench_cpu_ops``,
``decode_rows``; 2026-11-28, ms, OpenBLAS alone vs every call of <= 32 rows
to BLIS) at 4 rows 96.0 vs 87.8, 8 rows 98.5 vs 97.2, 12 rows 118.5 vs
115.9, 16 rows 115.3 vs 136.7, 32 rows 158.0 vs 192.6 (the limit was 32
until then). For big matmuls (training, prompt prefill) Debian's BLIS is
~2x slower than OpenBLAS.

How: MLX calls ``cblas_sgemm`` from whichever library defined it first in the
process. A short C shim that defines only ``cblas_sgemm`` is compiled once
(``gcc``, cached under ``$MLX_DISTILL_HOME/blas``) and loaded with
``RTLD_GLOBAL`` just before OpenBLAS; it forwards the skinny calls to BLIS
and all others, and every other BLAS/LAPACK symbol, to OpenBLAS. BLIS is
loaded privately with ``RTLD_DEEPBIND`` and one thread per core: BLIS's
``cblas_sgemm`` calls its own ``sgemm_``, and without DEEPBIND that name
would bind to OpenBLAS's global one, so every "BLIS" call ran OpenBLAS
(as it did before 2026-11-28; ``tests/test_perf_blas.py`` checks the
binding). Without BLIS, a C compiler or glibc's ``RTLD_DEEPBIND`` nothing
changes. ``MLX_DISTILL_SKINNY_BLAS=0`` turns it off.
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

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#ifndef RTLD_DEEPBIND
#error "BLIS would call OpenBLAS's sgemm_ without RTLD_DEEPBIND (glibc only)"
#endif

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                         float*, int);
static sgemm_fn big_fn, small_fn;
static int max_rows = DEFAULT_ROWS;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void) {
  /* The big library is already loaded (globally) by the time MLX calls; find its own symbol. */
  void* big = dlopen(BIG_PATH, RTLD_NOW | RTLD_NOLOAD);
  if (!big) big = dlopen(BIG_PATH, RTLD_NOW | RTLD_GLOBAL);
  if (big) big_fn = (sgemm_fn)dlsym(big, "cblas_sgemm");
  void* small = dlopen(SMALL_PATH, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (small) {
    small_fn = (sgemm_fn)dlsym(small, "cblas_sgemm");
    void (*threads)(long) = (void (*)(long))dlsym(small, "bli_thread_set_num_threads");
    if (threads && !getenv("BLIS_NUM_THREADS")) threads(sysconf(_SC_NPROCESSORS_ONLN));
  }
  const char* rows = getenv("MLX_DISTILL_SKINNY_ROWS");
  if (rows) max_rows = atoi(rows);
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  pthread_once(&once, init);
  /* MLX calls row-major x (m x k) @ w: m is the number of tokens. */
  sgemm_fn f = (small_fn && m <= max_rows) ? small_fn : big_fn;
  f(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

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
    small = blis_path()
    cc = shutil.which("gcc") or shutil.which("cc")
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no") or not small or not cc:
        return None
    defines = [f'-DBIG_PATH="{openblas}"', f'-DSMALL_PATH="{small}"', f"-DDEFAULT_ROWS={DEFAULT_ROWS}"]
    key = hashlib.sha256("|".join([SOURCE, *defines, cc]).encode()).hexdigest()[:16]
    try:
        from mlx_distill.runs import home

        out = home() / "blas" / f"skinny-{key}.so"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                src = Path(tmp) / "skinny.c"
                src.write_text(SOURCE)
                built = Path(tmp) / "skinny.so"
                subprocess.run([cc, "-O2", "-shared", "-fPIC", *defines, str(src), "-o", str(built), "-ldl",
                                "-lpthread"], check=True, capture_output=True, timeout=120)
                os.replace(built, out)
        ctypes.CDLL(str(out), mode=os.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError):
        return None  # no writable cache or no working compiler: plain OpenBLAS
    _state["path"] = str(out)
    return _state["path"]
