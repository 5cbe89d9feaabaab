#!/usr/bin/env bash
# MLX on CUDA (mlx[cuda]) vs torch + peft on CUDA: the same LoRA training comparison as the CPU
# benchmark (scripts/bench_train.py), in one short run (~2-4 minutes on an H100), printing one
# JSON object as its last line.
#
# Self-contained: a random-weight model (default: Qwen2.5-0.5B's shape; SHAPE=smollm2-135m for the
# demo student's) is written once as safetensors and loaded by both frameworks, with random token
# batches of realistic lengths; speed does not depend on the weights' values. Nothing of the dev
# machine is needed: no OpenBLAS, no demo model, no data.
#
# Needs on that machine: python3 with torch (CUDA), transformers, peft, safetensors, numpy, click,
# pyyaml, tqdm, jinja2; and mlx, mlx-cuda-13 (or -12) and mlx-lm, e.g. from carried wheels:
#   python3 -m pip install --no-deps --target /tmp/site mlx-*.whl mlx_cuda_13-*.whl mlx_lm-*.whl
#   PYTHONPATH=/tmp/site scripts/bench_cuda.sh
# Options (environment): SHAPE, DTYPE (bfloat16|float32), BATCH (rows per step), STEPS, WARMUP,
# LAYERS (adapted layers; default all), ROUNDS, OUT (a folder for the log and the JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false MLX_DISTILL_BLAS=off
SHAPE=${SHAPE:-qwen0.5b}
LAYERS=${LAYERS:-$([ "$SHAPE" = qwen0.5b ] && echo 24 || echo 30)}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
"$PY" - <<'PY'
import mlx.core as mx
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert mx.default_device() == mx.gpu, f"MLX has no GPU backend here (default device {mx.default_device()}): install mlx-cuda"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; mlx {mx.__version__} on {mx.default_device()}")
PY
"$PY" scripts/bench_train.py --device gpu --model synthetic --shape "$SHAPE" --dtype "${DTYPE:-bfloat16}" \
    --batch-size "${BATCH:-16}" --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" --layers "$LAYERS" \
    --rounds "${ROUNDS:-1}" --ways mlx,torch ${NO_WRITE:+--no-write} 2>&1 | tee "$OUT/bench_cuda.log"
tail -n 1 "$OUT/bench_cuda.log" > "$OUT/bench_cuda.json"
