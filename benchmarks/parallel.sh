#!/usr/bin/env bash
# More than one process on this CPU (gloo): the wt103 model's 4-layer slice (recipes/wt103*.yaml,
# model.n_layers=4; fp32, batch 1, activation checkpointing) at 16k and 32k tokens (full attention:
# 16k) on 1 process and split over 2 (train.context_parallel=2): peak RSS, the model and
# optimizer's memory and what a step adds (after a warmup step, SBTRAIN_ALLOCATOR=glibc), the
# activations (counted by PyTorch's memory tracker over the warmup step), tokens/s and bytes sent
# per step; then FSDP2 against DDP on 2 processes at 8k (what each holds of the model and
# optimizer).
#   benchmarks/parallel.sh   -> benchmarks/results/parallel-{cp,cp-full,ddp,fsdp}-cpu.json,
#                               parallel-bytes.json
#   SMOKE=1 OUT_DIR=/tmp/r benchmarks/parallel.sh      every case at a toy size (seconds)
# The bytes for 8k-64k tokens (scatterbrain flat, full growing) come from the collective sizes:
# python -m sbtrain.bench.parallel is the worker; sbtrain.attention.context_parallel.traffic
# is the formula the counted bytes match (tests/unit/test_context_parallel.py).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
r=${OUT_DIR:-benchmarks/results}
mkdir -p "$r"
lengths=16384,32768 short=8192 vocab=267744 steps=1
model=(model.n_layers=4)
if [ -n "${SMOKE:-}" ]; then
  lengths=512 short=512 vocab=500 model=(model.n_layers=1 model.d_model=32 model.n_heads=2 model.d_ff=64
    "model.adaptive_cutoffs=[100]")
fi
common=(train.precision=fp32 train.device=cpu train.activation_checkpointing=true model.dropout=0.0
  "${model[@]}")
flags=(--vocab-size $vocab --steps $steps)
# after one untimed step, under glibc (which returns freed blocks), so that what a timed step adds
# above what the process holds between steps is its activations and temporaries
# (full attention at the shorter length only: its counted bytes against the formula's)
SBTRAIN_ALLOCATOR=glibc $sbtrain bench train recipes/wt103.yaml "${common[@]}" train.batch_size=1 \
  "${flags[@]}" --warmup 1 --lengths $lengths --context-parallel 1,2 --out "$r/parallel-cp-cpu.json"
SBTRAIN_ALLOCATOR=glibc $sbtrain bench train recipes/wt103-full.yaml "${common[@]}" \
  train.batch_size=1 "${flags[@]}" --warmup 1 --lengths "${lengths%%,*}" --context-parallel 1,2 \
  --out "$r/parallel-cp-full-cpu.json"
for parallel in ddp fsdp; do  # a sequence per process; what each holds does not depend on length
  $sbtrain bench train recipes/wt103.yaml "${common[@]}" train.batch_size=2 "${flags[@]}" \
    --warmup 0 --lengths $short --processes 2 --parallel $parallel \
    --out "$r/parallel-$parallel-cpu.json"
done
$python - "$r" <<'PY'
import json, sys
from sbtrain.attention.context_parallel import traffic
from sbtrain.tasks import load_recipe
rows = []
for name in ("wt103", "wt103-full"):
    recipe = load_recipe(f"recipes/{name}.yaml")
    a, m = recipe.model.attention, recipe.model
    for length in (8192, 16384, 32768, 65536):
        sent = m.n_layers * traffic(a.kind, 1, m.n_heads, m.head_dim, length, 2, a.window or 0,
                                    a.n_features or 0, forwards=2)  # checkpointing: 2 forwards
        rows.append({"recipe": name, "attention": a.kind, "length": length, "context_parallel": 2,
                     "layers": m.n_layers, "activation_checkpointing": True,
                     "sent_bytes_per_step": sent})
        print(f"| {name} | {length} | {sent / 2**20:.2f} MiB |")
json.dump({"benchmark": "parallel-bytes", "rows": rows}, open(f"{sys.argv[1]}/parallel-bytes.json", "w"), indent=1)
PY
