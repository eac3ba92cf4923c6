#!/usr/bin/env bash
# The README's CPU benchmark tables: run them one at a time on a quiet machine.
#   benchmarks/cpu.sh        -> benchmarks/results/{attention,approx,generate,train-wt103-*,preprocess}-cpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
r=benchmarks/results
$sbtrain bench attention --lengths 2048,4096,8192,16384 --out $r/attention-cpu.json
$sbtrain bench approx --budget 64 --length 1024 --seeds 3 --out $r/approx-cpu.json
$sbtrain bench generate --contexts 1024,4096,16384 --steps 128 --out $r/generate-cpu.json
# the long-context study: both models at 2k..32k, batch 1, fp32, activation checkpointing on,
# one command per length so that each finishes in minutes (one timed step; the first step is
# timed at 4k and over); the checkpointing's time cost at 2k; where a 16k step's time goes
wt103="recipes/wt103.yaml recipes/wt103-full.yaml train.batch_size=1 train.precision=fp32 \
  train.device=cpu --vocab-size 267744 --checkpointing on --steps 1"
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  --vocab-size 267744 --checkpointing on --steps 1 --warmup 0 --lengths 32768 \
  --out $r/train-wt103-L32768-cpu.json
$sbtrain bench train $wt103 --warmup 1 --lengths 2048 --out $r/train-wt103-L2048-ckpt-cpu.json
$sbtrain bench train $wt103 --warmup 0 --lengths 16384 --out $r/train-wt103-L16384-ckpt-cpu.json
$sbtrain bench train $wt103 --warmup 0 --lengths 4096,8192 --out $r/train-wt103-L4096-8192-cpu.json
$sbtrain bench train recipes/wt103-full.yaml train.batch_size=1 train.precision=fp32 \
  train.device=cpu --vocab-size 267744 --checkpointing on --steps 1 --warmup 0 --lengths 32768 \
  --out $r/train-wt103-full-L32768-cpu.json
python benchmarks/merge_train.py $r/train-wt103-long-cpu.json \
  $r/train-wt103-L{2048-ckpt,4096-8192,16384-ckpt,32768}-cpu.json $r/train-wt103-full-L32768-cpu.json
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  --vocab-size 267744 --lengths 2048 --checkpointing both --steps 1 --warmup 1 \
  --out $r/train-wt103-checkpointing-cpu.json
$sbtrain bench train recipes/wt103.yaml train.batch_size=1 train.precision=fp32 train.device=cpu \
  --vocab-size 267744 --lengths 16384 --checkpointing on --breakdown --steps 1 --warmup 0 \
  --out $r/train-wt103-L16384-breakdown-cpu.json
$sbtrain bench preprocess --megabytes 500 --workers 2 --out $r/preprocess-cpu.json
