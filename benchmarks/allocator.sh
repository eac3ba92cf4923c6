#!/usr/bin/env bash
# CPU allocators side by side (issue 26): one `sbtrain bench train` process per allocator, recipe
# and length (each its own fresh process, SBTRAIN_ALLOCATOR set): step time, CPU time in user
# space and in the kernel, minor page faults, peak RSS. Run it on a quiet machine: it records the
# load average before each case.
#  1. every allocator, the wt103 scatterbrain and full models' 4-layer slice (model.n_layers=4),
#     2k, 8k, 32k tokens, fp32, batch 1, activation checkpointing on;
#  2. the whole 16-layer scatterbrain model at 8k and 32k: glibc and the caching allocators;
#  3. 20 steps at 8k (4-layer slice): resident memory after each step, the same allocators as 2.
#   benchmarks/allocator.sh   -> benchmarks/results/allocator-cpu.{json,png} (1),
#                                allocator-whole-cpu.{json,png} (2), allocator-steps-cpu.json (3)
#   SMOKE=1 OUT_DIR=/tmp/a benchmarks/allocator.sh      toy sizes (seconds)
# ALLOCATORS: which in 1 (default: glibc jemalloc jemalloc-default tcmalloc tcmalloc-default
# mimalloc mimalloc-default); WHOLE: which in 2 and 3 (default: glibc tcmalloc mimalloc); STEPS:
# the steps of 3 (default 20; 0 leaves 3 out).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
r=${OUT_DIR:-benchmarks/results}
allocators=${ALLOCATORS-glibc jemalloc jemalloc-default tcmalloc tcmalloc-default mimalloc mimalloc-default}
whole=${WHOLE-glibc tcmalloc mimalloc}
lengths=(2048 8192 32768) slice=(model.n_layers=4) vocab=267744 steps=${STEPS:-20}
if [ -n "${SMOKE:-}" ]; then
  lengths=(256 512 1024) slice=(model.n_layers=1 model.d_model=32 model.n_heads=2 model.d_ff=64
    "model.adaptive_cutoffs=[100]")
  vocab=500 steps=3 whole=glibc
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(train.batch_size=1 train.precision=fp32 train.device=cpu)
merge() {  # OUT.json: the cases run since the last merge, if any
  compgen -G "$tmp/*.json" >/dev/null || return 0
  $python benchmarks/merge_train.py "$1" "$tmp"/*.json
  rm -f "$tmp"/*.json
}
case_() {  # allocator recipe length steps warmup [overrides...] -> one JSON file in $tmp
  local allocator=$1 recipe=$2 length=$3 n=$4 warmup=$5
  shift 5
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  SBTRAIN_ALLOCATOR=$allocator $sbtrain bench train "recipes/$recipe.yaml" "${common[@]}" "$@" \
    --vocab-size "$vocab" --checkpointing on --lengths "$length" --steps "$n" --warmup "$warmup" \
    --out "$tmp/$(date +%s%N)-$allocator-$recipe-$length.json" >/dev/null
  echo "| $allocator $recipe $length (load before: $load)" >&2
}
for allocator in $allocators; do
  for recipe in wt103 wt103-full; do
    for length in "${lengths[@]}"; do
      warmup=0 n=1
      [ "$length" = "${lengths[0]}" ] && warmup=1 n=3
      case_ "$allocator" "$recipe" "$length" "$n" "$warmup" "${slice[@]}"
    done
  done
done
merge "$r/allocator-cpu.json"
for allocator in $whole; do
  for length in "${lengths[@]:1}"; do
    # shellcheck disable=SC2046  # the smoke's model overrides: split on purpose
    case_ "$allocator" wt103 "$length" 1 0 $([ -n "${SMOKE:-}" ] && echo "${slice[@]}")
  done
done
merge "$r/allocator-whole-cpu.json"
if [ "$steps" != 0 ]; then
  for allocator in $whole; do
    case_ "$allocator" wt103 "${lengths[1]}" "$steps" 0 "${slice[@]}"
  done
fi
merge "$r/allocator-steps-cpu.json"
