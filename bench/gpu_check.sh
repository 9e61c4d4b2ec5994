#!/usr/bin/env bash
# The GPU checks in one go, for a session that is lent a CUDA machine (CI never has one). From the device tool:
#     run(command="bash bench/gpu_check.sh", timeout_s=540)
# That machine reaches no package index: it runs on its own python3 (CUDA PyTorch, transformers, peft,
# safetensors, pytest are there) with lorakit from this tree on PYTHONPATH; a .whl/ folder in the tree
# (carried: carry=[".whl"]) is installed first, e.g. bitsandbytes for its CUDA kernels as an oracle.
#   1. the gpu-marked tests (tests/test_gpu.py and friends: NF4 on CUDA, streamed QLoRA load, a bf16 QLoRA
#      step, per-row adapters, all against the CPU paths)
#   2. bench_big on the 0.97B shape with --device cuda: streamed QLoRA vs LoRA steps at 1x64 and 1x512,
#      the allocator's peaks, the no-grad forward and the eval of 40 rows
# Budget: under 8 minutes on one GPU (the model is written first, on the CPU, ~1-2 min on 16 cores).
# Every step runs under its own timeout and a failure does not stop the next; results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt" || exit 1
import importlib.util, torch
assert torch.cuda.is_available(), "no CUDA device visible to this python3"
print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "| bf16:", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "safetensors", "bitsandbytes", "lorakit"):
    spec = importlib.util.find_spec(name)
    print(name, "missing" if spec is None else getattr(__import__(name), "__version__", spec.origin))
EOF
# only the files holding gpu-marked tests: the others import optional packages (fastapi, gguf) this image lacks
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "pytest.mark.gpu" tests) 2>&1 \
    | tee "$OUT/gpu-tests.txt" || status=1
timeout 200 python3 bench/bench_big.py make --model 1b --dir /tmp/bench-models 2>&1 | tail -3 || status=1
timeout 150 python3 bench/bench_big.py run --model 1b --dir /tmp/bench-models --device cuda --repeats 1 \
    --seqs 64 512 --stacks lorakit-qlora lorakit-lora --no-loads --no-merge --json "$OUT/big-1b-cuda.json" 2>&1 \
    | tail -20 || status=1
exit $status
