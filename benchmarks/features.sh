#!/usr/bin/env bash
# Issue 17's drop-in measurements of the feature maps on wiki-leads (recipes/wiki-leads.yaml):
#  1. the full-attention model (500 updates; reused if $RUNS/wiki-leads-full exists);
#  2. its attention swapped for local 64, performer 64, scatterbrain 32+32 and window 64 + 64
#     features, with every feature map, DRAWS draws each (5): test perplexity mean and std, goals;
#  3. Performer's error per layer vs the number of features on q, k, v captured from the model.
#   benchmarks/features.sh [RAW_DIR] -> benchmarks/results/features-dropin-cpu.json,
#                                       benchmarks/results/approx-checkpoint-cpu.{json,png}
# DATA: the preprocessed folder (data/wiki-leads-bin); RUNS: where the run goes (checkpoints);
# OUT_DIR: the results folder; EXTRA: overrides of the training run.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
raw=${1:-data/wiki-leads}
data=${DATA:-data/wiki-leads-bin}
runs=${RUNS:-checkpoints}
r=${OUT_DIR:-benchmarks/results}
[ -f "$data/meta.json" ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw="$raw" data.dir="$data"
ckpt=$runs/wiki-leads-full/checkpoint_best.pt
# shellcheck disable=SC2086  # EXTRA is key=value ...: split on purpose
[ -f "$ckpt" ] || $sbtrain train recipes/wiki-leads.yaml "model.attention={kind: full}" \
  data.dir="$data" train.save_dir="$runs/wiki-leads-full" train.tensorboard=false ${EXTRA:-} >/dev/null
$python benchmarks/features_dropin.py "$ckpt" --draws "${DRAWS:-5}" --out "$r/features-dropin-cpu.json"
$sbtrain bench approx --from-checkpoint "$ckpt" --blocks 2 --seeds "${DRAWS:-5}" \
  --out "$r/approx-checkpoint-cpu.json"
