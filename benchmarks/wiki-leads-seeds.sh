#!/usr/bin/env bash
# The wiki-leads comparison with error bars (recipes/wiki-leads.yaml, 64 keys or features per query):
#  train   every kind trained with seeds 1 2 3, test perplexity;
#  dropin  each seed's full model evaluated with every other kind swapped in (no retraining);
#  budget  scatterbrain's split of the same 64: window/features 0/64, 16/48, 32/32, 48/16, 64/0
#          (64/0 is local attention with a window of 64; 32/32 is the train study's run);
#  redraw  scatterbrain (window 32 + 32 features) trained with its features redrawn every 100
#          updates (train.redraw_interval=100).
# One JSON line per evaluated run (study, name, seed, updates, the validation curve, eval-ppl's
# figures) -> benchmarks/results/wiki-leads-seeds-cpu.jsonl; then mean and standard deviation per
# (study, name) -> wiki-leads-seeds-cpu.md and .json (python -m sbtrain.bench.seeds).
#
#   benchmarks/wiki-leads-seeds.sh [UPDATES [RAW_DIR]]      UPDATES: per run (default 500)
#   SEEDS="1 2" STUDIES="train budget" ONLY="full|local" OUT=/tmp/x.jsonl benchmarks/wiki-leads-seeds.sh 20
#   EXTRA="train.validate_interval=50" benchmarks/wiki-leads-seeds.sh     (more overrides for every run)
#
# Runs live in $RUNS/wiki-leads-seeds/u$UPDATES/ (RUNS: checkpoints); rerunning the script resumes
# an unfinished run and reuses a finished one (rerunning `sbtrain train` resumes), so it can be
# stopped at any time. DATA: the preprocessed folder (data/wiki-leads-bin).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
updates=${1:-500}
raw=${2:-data/wiki-leads}
seeds=${SEEDS:-1 2 3}
studies=${STUDIES:-train dropin budget redraw}
only=${ONLY:-.}
out=${OUT:-benchmarks/results/wiki-leads-seeds-cpu.jsonl}
runs=${RUNS:-checkpoints}/wiki-leads-seeds/u$updates
data=${DATA:-data/wiki-leads-bin}
[ -f "$data/meta.json" ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw="$raw" data.dir="$data"

# name | label of its run folder | model.attention | --attention of the drop-in swap
kinds='full|full|{kind: full}|full
scatterbrain|scatterbrain-w32-f32|{kind: scatterbrain, sparse: local, window: 32, n_features: 32}|scatterbrain sparse=local window=32 n_features=32
performer|performer-f64|{kind: performer, n_features: 64}|performer n_features=64
local|local-w64|{kind: local, window: 64}|local window=64
lsh|lsh-2x32|{kind: lsh, n_hashes: 2, bucket_size: 32}|lsh n_hashes=2 bucket_size=32'
budget='0/64|scatterbrain-w0-f64|{kind: scatterbrain, sparse: local, window: 0, n_features: 64}
16/48|scatterbrain-w16-f48|{kind: scatterbrain, sparse: local, window: 16, n_features: 48}
32/32|scatterbrain-w32-f32|{kind: scatterbrain, sparse: local, window: 32, n_features: 32}
48/16|scatterbrain-w48-f16|{kind: scatterbrain, sparse: local, window: 48, n_features: 16}
64/0|local-w64|{kind: local, window: 64}'
redraw='scatterbrain redraw 100|scatterbrain-w32-f32-redraw100|{kind: scatterbrain, sparse: local, window: 32, n_features: 32}|train.redraw_interval=100'

record() {  # study name seed attention save_dir: eval-ppl's JSON on stdin -> one line on stdout
  $python -m sbtrain.bench.seeds record "$5" study="$1" name="$2" seed="$3" attention_spec="$4"
}

train() {  # label attention seed [overrides] -> the run folder (trained, or resumed to the end)
  local save=$runs/$1-s$3
  # shellcheck disable=SC2086  # EXTRA and the overrides are key=value ...: split on purpose
  $sbtrain train recipes/wiki-leads.yaml "model.attention=$2" train.seed="$3" data.dir="$data" \
    train.max_updates="$updates" train.save_dir="$save" ${4:-} ${EXTRA:-} >"$save.log" 2>&1 \
    || { echo "training $save failed: see $save.log" >&2; exit 1; }
  echo "$save"
}

mkdir -p "$runs" "$(dirname "$out")"
: >"$out"
for seed in $seeds; do
  for study in $studies; do
    case $study in
      train) lines=$kinds ;;
      budget) lines=$budget ;;
      dropin) lines=$kinds ;;
      redraw) lines=$redraw ;;
      *) echo "unknown study $study (train, dropin, budget, redraw)" >&2; exit 2 ;;
    esac
    while IFS='|' read -r name label attention swap; do  # swap: the overrides for redraw
      [[ $name =~ $only ]] || continue
      if [ "$study" = dropin ]; then
        save=$(train full "{kind: full}" "$seed")
        # shellcheck disable=SC2086  # swap is KIND key=value ...: split on purpose
        $sbtrain eval-ppl "$save/checkpoint_best.pt" --attention $swap --json \
          | record dropin "$name" "$seed" "$attention" "$save" | tee -a "$out"
      else
        overrides=""
        [ "$study" = redraw ] && overrides=$swap
        save=$(train "$label" "$attention" "$seed" "$overrides")
        $sbtrain eval-ppl "$save/checkpoint_best.pt" --json \
          | record "$study" "$name" "$seed" "$attention" "$save" | tee -a "$out"
      fi
    done <<<"$lines"
  done
done
$python -m sbtrain.bench.seeds "$out" --out "${out%.jsonl}.md"
