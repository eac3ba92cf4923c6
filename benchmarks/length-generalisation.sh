#!/usr/bin/env bash
# Length generalisation on wiki-leads (recipes/wiki-leads.yaml): the same small model trained at
# 256 tokens with each kind at one budget (64 keys or features per query) and both rope and
# sinusoidal positions, then evaluated on the test split at 256, 512, 1024 and 2048 tokens with
# perplexity per bucket of 128 positions. Training runs go one at a time.
#   benchmarks/length-generalisation.sh [UPDATES] [RAW_DIR]
#   KINDS="full" POSITIONS="rope" benchmarks/length-generalisation.sh 20   # one run end to end
# -> benchmarks/results/length-generalisation-cpu.jsonl (one line per model and length), and the
#    README table and PNG from benchmarks/length_generalisation.py.
# DATA: the preprocessed folder (data/wiki-leads-bin); RUNS: where runs go (checkpoints);
# OUT: the results file; EXTRA: overrides of every training run; BUCKET: positions per bucket.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
updates=${1:-300}
raw=${2:-data/wiki-leads}
kinds=${KINDS:-full local performer scatterbrain}
positions=${POSITIONS:-rope sinusoidal}
lengths=${LENGTHS:-256 512 1024 2048}
out=${OUT:-benchmarks/results/length-generalisation-cpu.jsonl}
data=${DATA:-data/wiki-leads-bin}
runs=${RUNS:-checkpoints}
mkdir -p "$(dirname "$out")"
[ -f "$data/meta.json" ] || $sbtrain preprocess recipes/wiki-leads.yaml data.raw="$raw" data.dir="$data"
spec() {  # the attention of a kind at the budget: 64 keys or features per query
  case $1 in
    full) echo "{kind: full}" ;;
    local) echo "{kind: local, window: 64}" ;;
    performer) echo "{kind: performer, n_features: 64}" ;;
    scatterbrain) echo "{kind: scatterbrain, sparse: local, window: 32, n_features: 32}" ;;
    *) echo "unknown kind $1 (full, local, performer, scatterbrain)" >&2; exit 2 ;;
  esac
}
: > "$out"
for kind in $kinds; do
  for pos in $positions; do
    attention=$(spec "$kind")
    save=$runs/length-generalisation-$kind-$pos
    rm -rf "$save"
    start=$SECONDS
    # shellcheck disable=SC2086  # EXTRA is key=value ...: split on purpose
    $sbtrain train recipes/wiki-leads.yaml "model.attention=$attention" "model.positions=$pos" \
      data.dir="$data" data.tokens_per_sample=256 train.max_updates="$updates" \
      train.validate_interval="$updates" train.save_dir="$save" train.tensorboard=false \
      ${EXTRA:-} >/dev/null
    seconds=$((SECONDS - start))  # wall clock of the whole command, start-up included
    echo "trained $kind $pos: $updates updates in $seconds s" >&2
    for n in $lengths; do
      $sbtrain eval-ppl "$save/checkpoint_last.pt" --tokens-per-sample "$n" --by-position "${BUCKET:-128}" --json \
        | $python -c "import json, sys; r = json.load(sys.stdin); print(json.dumps({'kind': '$kind', 'attention_spec': '$attention', 'updates': $updates, 'train_seconds': $seconds, **r}))" \
        | tee -a "$out"
    done
  done
done
$python benchmarks/length_generalisation.py "$out" --png "${out%.jsonl}.png"
