#!/usr/bin/env bash
# Everything a GPU session checks and times, in one call (sized for ~10 minutes on an H100):
#   benchmarks/gpu.sh [OUT_DIR]     (default: $OUT when set, else benchmarks/results)
# 1. the fused Triton kernels compiled for the card against the dense float64 references, and the
#    modules' CUDA dispatch;
# 2. `bench kernels`: SDPA vs the PyTorch path vs Triton, bf16, 32k tokens per call;
# 3. `bench attention` on CUDA, every kind (fp32 inputs, as in the CPU table);
# 4. `bench train`: the wt103 model with full attention and with scatterbrain, bf16, 16k tokens
#    per step, at length 2048 and 16384.
# Each step has its own time limit, so one that hangs does not cost the others their results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
card=$($py -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null) \
  || { echo "benchmarks/gpu.sh: torch sees no CUDA GPU here" >&2; exit 2; }
log=$out/gpu-$card.log  # one log (the device tool brings back 8 files: this, 4 JSON, 3 PNG)
: > "$log"
step() {  # seconds, name, command...: run it with its output in the log, report its status
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$name: exit $?" | tee -a "$log"
}
step 180 tests $py -m pytest -q -x tests/unit/test_triton_kernels.py
step 120 kernels $py -m sbtrain bench kernels --out "$out/kernels-$card.json"
step 120 attention $py -m sbtrain bench attention --device cuda --repeats 10 \
  --lengths 2048,4096,8192,16384 --out "$out/attention-$card.json"
for length in 2048 16384; do
  step 90 "train-L$length" $py -m sbtrain bench train recipes/wt103-full.yaml recipes/wt103.yaml \
    data.tokens_per_sample=$length train.batch_size=$((16384 / length)) train.precision=bf16 \
    train.device=cuda --steps 10 --warmup 3 --vocab-size 267744 \
    --out "$out/train-wt103-L$length-$card.json"
done
