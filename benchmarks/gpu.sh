#!/usr/bin/env bash
# Everything a GPU session checks and times, in one call (sized for ~5-6 minutes on an H100/H200,
# so a 15-minute device budget leaves room to rerun it once). NOT YET RUN ON A GPU.
#   benchmarks/gpu.sh [RESULTS_DIR]     (default: benchmarks/results)
# 1. tests: the fused kernels compiled for the card against the float64 references (every shape
#    of tests/unit/test_triton_kernels.py) and the auto/pytorch/fused switch on CUDA tensors;
# 2. kernels: `bench kernels`, bf16 forward+backward, 8 heads x 64, 64k tokens per call at
#    L = 2k..64k: SDPA vs the PyTorch path vs the fused kernels (blocks 32 and 64), one run;
# 3. train-L2048, train-L16384: `bench train` of the wt103 model, full vs scatterbrain, bf16,
#    16k tokens per step (the rows name the attention_impl and any fallback);
# 4. gpt: the wt103-full shape with a tied 32k softmax, batch 12 x 2048, through `bench train`
#    and through a plain GPT loop (`bench gpt`), side by side: the 0.95x check.
# Each step has its own time limit and failing one does not stop the others. With $OUT set (the
# device tool), the log and one .tgz of every JSON/PNG are copied there (it brings back 8 files).
set -uo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
card=$($py -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null) \
  || { echo "benchmarks/gpu.sh: torch sees no CUDA GPU here" >&2; exit 2; }
log=$dir/gpu-$card.log
: > "$log"
# versions, and whether they are below the floor the fused path asks for (auto would fall back)
$py - >> "$log" 2>&1 <<'PY'
import torch, triton
from sbtrain.attention import dispatch
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(),
      "capability", torch.cuda.get_device_capability(), "floors", dispatch.TORCH_FLOOR,
      dispatch.TRITON_FLOOR, "problem:", dispatch.version_problem())
PY
step() {  # seconds, name, command...: run it with its output in the log, report its status
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$name: exit $?" | tee -a "$log"
}
step 200 tests $py -m pytest -q -x tests/unit/test_triton_kernels.py \
  tests/unit/test_attention_dispatch.py
step 150 kernels $py -m sbtrain bench kernels --lengths 2048,4096,8192,16384,32768,65536 \
  --tokens 65536 --repeats 10 --blocks 32,64 --out "$dir/kernels-$card.json"
for length in 2048 16384; do
  step 75 "train-L$length" $py -m sbtrain bench train recipes/wt103-full.yaml recipes/wt103.yaml \
    data.tokens_per_sample=$length train.batch_size=$((16384 / length)) train.precision=bf16 \
    train.device=cuda --steps 10 --warmup 3 --vocab-size 267744 \
    --out "$dir/train-wt103-L$length-$card.json"
done
step 60 gpt-sbtrain $py -m sbtrain bench train recipes/wt103-full.yaml model.output=softmax \
  train.batch_size=12 train.precision=bf16 train.device=cuda --steps 10 --warmup 3 \
  --vocab-size 32000 --out "$dir/train-wt103-full-softmax32k-$card.json"
step 45 gpt-plain $py -m sbtrain bench gpt --device cuda --steps 10 --warmup 3 \
  --out "$dir/gpt-plain-$card.json"
if [ -n "${OUT:-}" ] && [ "$OUT" != "$dir" ]; then
  cp "$log" "$OUT/"
  tar czf "$OUT/gpu-$card.tgz" -C "$dir" $(cd "$dir" && ls ./*-"$card".* 2>/dev/null)
fi
