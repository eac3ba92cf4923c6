#!/usr/bin/env bash
# The README's Copy-demo table: recipes/copy-demo.yaml trained with scatterbrain and with each
# baseline at the same per-query budget (16 keys or features; the copy distance is 64), the same
# 2000 updates, then test loss and accuracy on the copied half.
#   benchmarks/copy-demo.sh            -> benchmarks/results/copy-demo-cpu.jsonl
#   ONLY="full|local" EXTRA="train.max_updates=10" RUNS=/tmp/runs OUT=/tmp/x.jsonl benchmarks/copy-demo.sh
# ONLY: a regular expression of the kinds to run; EXTRA: overrides for every run; RUNS: where the
# runs go (default checkpoints/); OUT: the results file.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results/copy-demo-cpu.jsonl}
runs=${RUNS:-checkpoints}
mkdir -p "$runs" "$(dirname "$out")"
: > "$out"
while IFS='|' read -r name attention; do
  [[ $name =~ ${ONLY:-.} ]] || continue
  save=$runs/copy-demo-$name
  rm -rf "$save"
  # shellcheck disable=SC2086  # EXTRA is key=value ...: split on purpose
  $sbtrain train recipes/copy-demo.yaml "model.attention=$attention" train.save_dir="$save" \
    ${EXTRA:-} >/dev/null
  $sbtrain eval-ppl "$save/checkpoint_best.pt" --json \
    | $python -c "import json, sys; r = json.load(sys.stdin); w = json.loads(open('$save/train.jsonl').readlines()[-1])['wall']; print(json.dumps({'name': '$name', 'attention_spec': '''$attention''', 'train_seconds': w, **r}))" \
    | tee -a "$out"
done <<'KINDS'
scatterbrain|{kind: scatterbrain, sparse: lsh, n_hashes: 1, bucket_size: 4, n_buckets: 16, n_features: 12}
scatterbrain-local+lsh|{kind: scatterbrain, sparse: local+lsh, window: 4, n_hashes: 1, bucket_size: 4, n_buckets: 16, n_features: 8}
full|{kind: full}
local|{kind: local, window: 16}
performer|{kind: performer, n_features: 16}
lsh|{kind: lsh, n_hashes: 1, bucket_size: 16, n_buckets: 16}
KINDS
