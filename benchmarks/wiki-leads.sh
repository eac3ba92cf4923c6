#!/usr/bin/env bash
# The README's LM and drop-in tables on the wiki-leads corpus (recipes/wiki-leads.yaml):
#  1. the same model trained with each attention kind for the same 500 updates, test perplexity;
#  2. the full-attention model evaluated with every other kind swapped in (no retraining), at
#     the same per-query budget (64 keys or features of 512).
#   benchmarks/wiki-leads.sh [RAW_DIR]  -> benchmarks/results/wiki-leads-{train,dropin}-cpu.jsonl
# DATA: the preprocessed folder (data/wiki-leads-bin); RUNS: where runs go (checkpoints);
# OUT_DIR: the results folder; EXTRA: overrides of every training run.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
raw=${1:-data/wiki-leads}
data=${DATA:-data/wiki-leads-bin}
runs=${RUNS:-checkpoints}
r=${OUT_DIR:-benchmarks/results}
mkdir -p "$r"
[ -f "$data/meta.json" ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw="$raw" data.dir="$data"
kinds='full|{kind: full}|full
scatterbrain|{kind: scatterbrain, sparse: local, window: 32, n_features: 32}|scatterbrain sparse=local window=32 n_features=32
performer|{kind: performer, n_features: 64}|performer n_features=64
local|{kind: local, window: 64}|local window=64
lsh|{kind: lsh, n_hashes: 2, bucket_size: 32}|lsh n_hashes=2 bucket_size=32'
record() {  # name, attention, save dir: the eval JSON on stdin, with what produced it
  $python -c "import json, sys; r = json.load(sys.stdin); w = json.loads(open('$3/train.jsonl').readlines()[-1])['wall']; print(json.dumps({'name': '$1', 'attention_spec': '''$2''', 'train_seconds': w, **r}))"
}
out=$r/wiki-leads-train-cpu.jsonl
: > "$out"
while IFS='|' read -r name attention _; do
  save=$runs/wiki-leads-$name
  rm -rf "$save"
  # shellcheck disable=SC2086  # EXTRA is key=value ...: split on purpose
  $sbtrain train recipes/wiki-leads.yaml "model.attention=$attention" data.dir="$data" \
    train.save_dir="$save" ${EXTRA:-} >/dev/null
  $sbtrain eval-ppl "$save/checkpoint_best.pt" --json | record "$name" "$attention" "$save" | tee -a "$out"
done <<< "$kinds"
out=$r/wiki-leads-dropin-cpu.jsonl
: > "$out"
while IFS='|' read -r name attention spec; do
  # shellcheck disable=SC2086  # spec is KIND key=value ...: split on purpose
  $sbtrain eval-ppl "$runs/wiki-leads-full/checkpoint_best.pt" --attention $spec --json \
    | record "$name" "$attention" "$runs/wiki-leads-full" | tee -a "$out"
done <<< "$kinds"
