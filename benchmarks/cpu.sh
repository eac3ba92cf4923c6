#!/usr/bin/env bash
# The README's CPU benchmark tables: run them one at a time on a quiet machine.
#   benchmarks/cpu.sh        -> benchmarks/results/{attention,approx,generate,train-wt103-*,preprocess}-cpu.json
#   SMOKE=1 OUT_DIR=/tmp/r benchmarks/cpu.sh     every command at a toy size (seconds): it runs
# The long-context study: both models at 2k..32k, batch 1, fp32, activation checkpointing on,
# one command per length so that each finishes in minutes (one timed step; the first step is
# timed at 4k and over); the checkpointing's time cost at 2k; where a 16k step's time goes.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
r=${OUT_DIR:-benchmarks/results}
mkdir -p "$r"
L=(2048 4096 8192 16384 32768)    # the lengths of the long-context study
attention_lengths=2048,4096,8192,16384 attention_kinds=full,local,performer,lsh,scatterbrain
approx_length=1024 contexts=1024,4096,16384 steps=128
vocab=267744 megabytes=500 small=()
if [ -n "${SMOKE:-}" ]; then
  L=(32 64 128 256 512)
  attention_lengths=64 attention_kinds=scatterbrain approx_length=64 contexts=32 steps=2
  vocab=500 megabytes=1
  small=(model.n_layers=1 model.d_model=32 model.n_heads=2 model.d_ff=64 "model.adaptive_cutoffs=[100]")
fi
$sbtrain bench attention --kinds $attention_kinds --lengths $attention_lengths --out $r/attention-cpu.json
$sbtrain bench approx --budget 64 --length $approx_length --seeds 3 --out $r/approx-cpu.json
$sbtrain bench generate --contexts $contexts --steps $steps --out $r/generate-cpu.json
wt103=(recipes/wt103.yaml recipes/wt103-full.yaml train.batch_size=1 train.precision=fp32
  train.device=cpu "${small[@]}" --vocab-size $vocab --checkpointing on --steps 1)
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  "${small[@]}" --vocab-size $vocab --checkpointing on --steps 1 --warmup 0 --lengths "${L[4]}" \
  --out $r/train-wt103-L32768-cpu.json
$sbtrain bench train "${wt103[@]}" --warmup 1 --lengths "${L[0]}" --out $r/train-wt103-L2048-ckpt-cpu.json
$sbtrain bench train "${wt103[@]}" --warmup 0 --lengths "${L[3]}" --out $r/train-wt103-L16384-ckpt-cpu.json
$sbtrain bench train "${wt103[@]}" --warmup 0 --lengths "${L[1]},${L[2]}" \
  --out $r/train-wt103-L4096-8192-cpu.json
$sbtrain bench train recipes/wt103-full.yaml train.batch_size=1 train.precision=fp32 \
  train.device=cpu "${small[@]}" --vocab-size $vocab --checkpointing on --steps 1 --warmup 0 \
  --lengths "${L[4]}" --out $r/train-wt103-full-L32768-cpu.json
$python benchmarks/merge_train.py $r/train-wt103-long-cpu.json \
  $r/train-wt103-L{2048-ckpt,4096-8192,16384-ckpt,32768}-cpu.json $r/train-wt103-full-L32768-cpu.json
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  "${small[@]}" --vocab-size $vocab --lengths "${L[0]}" --checkpointing both --steps 1 --warmup 1 \
  --out $r/train-wt103-checkpointing-cpu.json
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  "${small[@]}" --vocab-size $vocab --lengths "${L[3]}" --checkpointing on --breakdown --steps 1 \
  --warmup 0 --out $r/train-wt103-L16384-breakdown-cpu.json
$sbtrain bench preprocess --megabytes $megabytes --workers 2 --out $r/preprocess-cpu.json
