#!/usr/bin/env bash
# The GPU checks in one go, for a session that is lent a CUDA machine (CI never has one):
#   1. the gpu-marked tests (NF4 on CUDA against bitsandbytes' CUDA kernels, bf16 compute)
#   2. the streamed-QLoRA benchmark on the 0.97B shape (load peak, batch-1 steps), CUDA visible
# Budget: under 8 minutes on one GPU. Results land in $OUT (the device tool brings them back).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q torch -e '.[dev]'
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 240 python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt"
timeout 60 python bench/bench_big.py make --model 1b --dir /tmp/bench-models
timeout 180 python bench/bench_big.py run --model 1b --dir /tmp/bench-models --repeats 1 --seqs 64 512 \
    --no-merge --json "$OUT/big-1b-cuda.json" 2>&1 | tail -20
