#!/usr/bin/env bash
# The recall study (issue 23), on this CPU: where a sparse + low-rank attention should beat a
# window and a low-rank state alone. Recipes: recipes/recall/mqar-cpu.yaml (64 tokens, 4 pairs),
# mqar-cpu-128.yaml (128 tokens, 4 pairs), selective-copy-cpu.yaml, passkey-cpu.yaml.
#  dropin     the full-attention MQAR model of each length (seed 1), every kind swapped in at
#             4, 8, 16, 32 keys or features per query, DRAWS draws each (sbtrain bench recall):
#             -> recall-dropin-{64,128}-cpu.{json,png}
#  mechanism  on the 64-token model: per layer and head, how often each query's top key (exact
#             scores) lies in a kind's exact support at budget BUDGET, and the features' error
#             outside it (sbtrain bench approx --attention) -> recall-mechanism-cpu.jsonl
#  train      MQAR at 64 tokens trained from scratch with every kind at budget BUDGET, SEEDS
#             -> recall-train-cpu.jsonl (+ .md: test accuracy mean ± std, the update each run
#             first reached 90% validation accuracy)
#  tasks      selective copying and passkey with every kind at budget BUDGET, seed 1
#             -> recall-tasks-cpu.jsonl (+ .md)
#   benchmarks/recall.sh                       every study (hours: the trainings run one at a time)
#   STUDIES="dropin mechanism" DRAWS=3 benchmarks/recall.sh
#   SMOKE=1 RUNS=/tmp/r OUT_DIR=/tmp/o DATA=/tmp/d benchmarks/recall.sh    toy sizes (seconds)
# RUNS: where runs go (checkpoints); DATA: where data goes (data/recall); EXTRA: overrides of
# every training run; KINDS, LENGTHS, TASKS (recipe:task pairs of the tasks study): subsets. A
# finished run is reused, an unfinished resumed.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
studies=${STUDIES:-dropin mechanism train tasks}
seeds=${SEEDS:-1 2}
draws=${DRAWS:-3}
budget=${BUDGET:-8}
budgets=${BUDGETS:-4,8,16,32}
kinds=${KINDS:-full local performer lsh scatterbrain scatterbrain-lsh}
lengths=${LENGTHS:-64 128}
runs=${RUNS:-checkpoints}/recall
datas=${DATA:-data/recall}
r=${OUT_DIR:-benchmarks/results}
extra=${EXTRA:-}
size=()  # SMOKE: tiny data and training, to check that every step runs
if [ -n "${SMOKE:-}" ]; then
  size=(train.max_updates=4 train.validate_interval=2 train.batch_size=8)
  budgets=4,8 budget=8 draws=1 seeds=1
fi
mkdir -p "$runs" "$r"

small() {  # the data overrides of SMOKE for a recipe's task section
  [ -n "${SMOKE:-}" ] && echo "$1.train=64 $1.valid=8 $1.test=8 $1.chunk=32"
  return 0
}

data_of() {  # recipe name -> its data folder (preprocessed once)
  local name=$1 task=$2 data=$datas/$1
  # shellcheck disable=SC2046  # small's overrides: split on purpose
  [ -f "$data/meta.json" ] || $sbtrain preprocess "recipes/recall/$name.yaml" data.dir="$data" \
    $(small "$task") >/dev/null
  echo "$data"
}

spec() {  # kind budget -> the attention at that many keys or features per query
  local b=$2
  case $1 in
    full) echo "{kind: full}" ;;
    local) echo "{kind: local, window: $b}" ;;
    performer) echo "{kind: performer, n_features: $b}" ;;
    lsh) echo "{kind: lsh, n_hashes: 2, bucket_size: $((b / 2))}" ;;
    scatterbrain) echo "{kind: scatterbrain, sparse: local, window: $((b / 2)), n_features: $((b / 2))}" ;;
    scatterbrain-lsh) echo "{kind: scatterbrain, sparse: lsh, n_hashes: 2, bucket_size: $((b / 4)), n_features: $((b / 2))}" ;;
    *) echo "unknown kind $1" >&2; exit 2 ;;
  esac
}

swap() {  # the same as --attention words
  echo "$1" | tr -d '{},' | sed 's/kind: //; s/: /=/g'
}

train() {  # recipe task label attention seed -> the run folder, trained to the end
  local recipe=$1 task=$2 label=$3 attention=$4 seed=$5
  local save=$runs/$recipe-$label-s$seed data
  data=$(data_of "$recipe" "$task")
  # shellcheck disable=SC2046,SC2086  # overrides: split on purpose
  $sbtrain train "recipes/recall/$recipe.yaml" "model.attention=$attention" train.seed="$seed" \
    data.dir="$data" train.save_dir="$save" "${size[@]}" $(small "$task") $extra \
    >"$save.log" 2>&1 || { echo "training $save failed: see $save.log" >&2; exit 1; }
  echo "$save"
}

record() {  # study name seed attention run: eval-ppl's JSON on stdin -> one line
  $python -m sbtrain.bench.seeds record "$5" study="$1" name="$2" seed="$3" attention_spec="$4"
}

for study in $studies; do
  case $study in
    dropin)
      for length in $lengths; do
        recipe=$([ "$length" = 64 ] && echo mqar-cpu || echo "mqar-cpu-$length")
        save=$(train "$recipe" mqar full "{kind: full}" 1)
        $sbtrain bench recall "$save/checkpoint_best.pt" --budgets "$budgets" --draws "$draws" \
          --out "$r/recall-dropin-$length-cpu.json"
      done ;;
    mechanism)
      save=$(train mqar-cpu mqar full "{kind: full}" 1)
      out=$r/recall-mechanism-cpu.jsonl
      : >"$out"
      for kind in local lsh scatterbrain scatterbrain-lsh; do
        attention=$(spec "$kind" "$budget")
        # shellcheck disable=SC2046  # KIND key=value ...: split on purpose
        $sbtrain bench approx --from-checkpoint "$save/checkpoint_best.pt" \
          --attention $(swap "$attention") --out "$r/recall-mechanism-tmp.json" >/dev/null
        $python -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({'kind': sys.argv[2], 'budget': int(sys.argv[3]), 'attention_spec': sys.argv[4], 'mean': r['mean'], 'rows': r['rows']}))" \
          "$r/recall-mechanism-tmp.json" "$kind" "$budget" "$attention" | tee -a "$out"
      done
      rm -f "$r/recall-mechanism-tmp."* ;;
    train | tasks)
      if [ "$study" = train ]; then recipes="mqar-cpu:mqar"; kind_seeds=$seeds
      else recipes=${TASKS:-selective-copy-cpu:selective_copy passkey-cpu:passkey}; kind_seeds=1; fi
      out=$r/recall-$study-cpu.jsonl
      : >"$out"
      for pair in $recipes; do
        recipe=${pair%%:*} task=${pair##*:}
        for seed in $kind_seeds; do
          for kind in $kinds; do
            attention=$(spec "$kind" "$budget")
            save=$(train "$recipe" "$task" "$kind-b$budget" "$attention" "$seed")
            $sbtrain eval-ppl "$save/checkpoint_best.pt" --json \
              | record "$recipe" "$kind" "$seed" "$attention" "$save" | tee -a "$out"
          done
        done
      done
      $python -m sbtrain.bench.seeds "$out" --metric accuracy --reach 0.9 --out "${out%.jsonl}.md" ;;
    *) echo "unknown study $study (dropin, mechanism, train, tasks)" >&2; exit 2 ;;
  esac
done
