#!/usr/bin/env bash
# The README's LM and drop-in tables on the wiki-leads corpus (recipes/wiki-leads.yaml):
#  1. the same model trained with each attention kind for the same 500 updates, test perplexity;
#  2. the full-attention model evaluated with every other kind swapped in (no retraining), at
#     the same per-query budget (64 keys or features of 512).
#   benchmarks/wiki-leads.sh [RAW_DIR]  -> benchmarks/results/wiki-leads-{train,dropin}-cpu.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
raw=${1:-data/wiki-leads}
[ -f data/wiki-leads-bin/meta.json ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw=$raw
kinds='full|{kind: full}|full
scatterbrain|{kind: scatterbrain, sparse: local, window: 32, n_features: 32}|scatterbrain sparse=local window=32 n_features=32
performer|{kind: performer, n_features: 64}|performer n_features=64
local|{kind: local, window: 64}|local window=64
lsh|{kind: lsh, n_hashes: 2, bucket_size: 32}|lsh n_hashes=2 bucket_size=32'
record() {  # name, attention, save dir: the eval JSON on stdin, with what produced it
  python3 -c "import json, sys; r = json.load(sys.stdin); w = json.loads(open('$3/train.jsonl').readlines()[-1])['wall']; print(json.dumps({'name': '$1', 'attention_spec': '''$2''', 'train_seconds': w, **r}))"
}
out=benchmarks/results/wiki-leads-train-cpu.jsonl
: > "$out"
while IFS='|' read -r name attention _; do
  save=checkpoints/wiki-leads-$name
  rm -rf "$save"
  $sbtrain train recipes/wiki-leads.yaml "model.attention=$attention" train.save_dir=$save >/dev/null
  $sbtrain eval-ppl $save/checkpoint_best.pt --json | record "$name" "$attention" "$save" | tee -a "$out"
done <<< "$kinds"
out=benchmarks/results/wiki-leads-dropin-cpu.jsonl
: > "$out"
while IFS='|' read -r name attention spec; do
  # shellcheck disable=SC2086  # spec is KIND key=value ...: split on purpose
  $sbtrain eval-ppl checkpoints/wiki-leads-full/checkpoint_best.pt --attention $spec --json \
    | record "$name" "$attention" checkpoints/wiki-leads-full | tee -a "$out"
done <<< "$kinds"
