#!/usr/bin/env bash
# The CPU-sized Long Range Arena comparison (issue 14): ListOps and Pathfinder
# (recipes/lra/{listops,pathfinder}-cpu*.yaml) with scatterbrain, full, local, performer and lsh at
# the same per-query budget, trained with each seed, then test accuracy (eval-ppl --json).
# One JSON line per evaluated run (study = the task, name = the kind, seed, updates, the validation
# curve, eval-ppl's figures) -> benchmarks/results/lra-cpu.jsonl; then mean and standard deviation
# of the accuracy per (task, kind) -> lra-cpu.md and .json (python -m sbtrain.bench.seeds).
#
#   benchmarks/lra-cpu.sh                      every task and kind, seed 1, the recipes' updates
#   TASKS=listops KINDS="full lsh" SEEDS="1 2" UPDATES=500 benchmarks/lra-cpu.sh
#   EXTRA="train.validate_interval=250" benchmarks/lra-cpu.sh    (more overrides for every run)
#
# Runs live in $RUNS/lra-cpu/ (RUNS: checkpoints), the generated data in $DATA/<task>-cpu-bin (DATA:
# data/lra, made once; PREPROCESS: overrides of that step); rerunning resumes an unfinished run and
# reuses a finished one.
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
tasks=${TASKS:-listops pathfinder}
kinds=${KINDS:-scatterbrain full local performer lsh}
seeds=${SEEDS:-1}
out=${OUT:-benchmarks/results/lra-cpu.jsonl}
runs=${RUNS:-checkpoints}/lra-cpu
datas=${DATA:-data/lra}
mkdir -p "$runs" "$(dirname "$out")"
: >"$out"
for task in $tasks; do
  data=$datas/$task-cpu-bin
  # shellcheck disable=SC2086  # PREPROCESS is key=value ...: split on purpose
  [ -f "$data/meta.json" ] || $sbtrain preprocess "recipes/lra/$task-cpu.yaml" data.dir="$data" \
    ${PREPROCESS:-}
  for seed in $seeds; do
    for kind in $kinds; do
      recipe=recipes/lra/$task-cpu.yaml
      [ "$kind" = scatterbrain ] || recipe=recipes/lra/$task-cpu-$kind.yaml
      save=$runs/$task-$kind${UPDATES:+-u$UPDATES}-s$seed
      # shellcheck disable=SC2086  # EXTRA is key=value ...: split on purpose
      $sbtrain train "$recipe" train.seed="$seed" train.save_dir="$save" data.dir="$data" \
        ${UPDATES:+train.max_updates=$UPDATES} ${EXTRA:-} >"$save.log" 2>&1 \
        || { echo "training $save failed: see $save.log" >&2; exit 1; }
      $sbtrain eval-ppl "$save/checkpoint_best.pt" --json \
        | $python -m sbtrain.bench.seeds record "$save" study="$task" name="$kind" seed="$seed" \
        | tee -a "$out"
    done
  done
done
$python -m sbtrain.bench.seeds "$out" --metric accuracy --out "${out%.jsonl}.md"
