#!/usr/bin/env bash
# Issue 17's drop-in measurements of the feature maps on wiki-leads (recipes/wiki-leads.yaml):
#  1. the full-attention model (500 updates; reused if checkpoints/wiki-leads-full exists);
#  2. its attention swapped for local 64, performer 64, scatterbrain 32+32 and window 64 + 64
#     features, with every feature map, 5 draws each: test perplexity mean and std, goal checks;
#  3. Performer's error per layer vs the number of features on q, k, v captured from the model.
#   benchmarks/features.sh [RAW_DIR] -> benchmarks/results/features-dropin-cpu.json,
#                                       benchmarks/results/approx-checkpoint-cpu.{json,png}
set -euo pipefail
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
raw=${1:-data/wiki-leads}
[ -f data/wiki-leads-bin/meta.json ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw=$raw
ckpt=checkpoints/wiki-leads-full/checkpoint_best.pt
[ -f $ckpt ] || $sbtrain train recipes/wiki-leads.yaml "model.attention={kind: full}" \
  train.save_dir=checkpoints/wiki-leads-full train.tensorboard=false >/dev/null
$python benchmarks/features_dropin.py $ckpt --draws 5 --out benchmarks/results/features-dropin-cpu.json
$sbtrain bench approx --from-checkpoint $ckpt --blocks 2 --seeds 5 \
  --out benchmarks/results/approx-checkpoint-cpu.json
