#!/usr/bin/env bash
# The drop-in table through the Hugging Face path: an sbtrain checkpoint exported with
# `sbtrain export`, scored with `sbtrain eval-ppl hf:FOLDER` with its own attention and with
# scatterbrain, performer, local and lsh swapped in, against the native drop-in
# (`sbtrain eval-ppl CKPT --attention ...`) on the same test split. Both build the swapped
# kernels under the recipe's train.seed (the export records it), so the draws are the same.
#   benchmarks/hf-dropin.sh CKPT [DATA_DIR] [OUT] -> benchmarks/results/hf-dropin-cpu.jsonl
# e.g. benchmarks/hf-dropin.sh checkpoints/wiki-leads-full/checkpoint_best.pt data/wiki-leads-bin
# ONLY: a regular expression of the swaps to score ("^$": the model's own attention only).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
sbtrain=${SBTRAIN:-sbtrain}
python=${PYTHON:-python3}
ckpt=$1
data=${2:-data/wiki-leads-bin}
out=${3:-benchmarks/results/hf-dropin-cpu.jsonl}
folder=$(mktemp -d)/exported
trap 'rm -rf "$(dirname "$folder")"' EXIT
$sbtrain export "$ckpt" "$folder" --data "$data" >/dev/null
swaps=(
  ""
  "scatterbrain sparse=local window=32 n_features=32"
  "performer n_features=64"
  "local window=64"
  "lsh n_hashes=2 bucket_size=32"
)
: >"$out.tmp"
for swap in "${swaps[@]}"; do
  [[ $swap =~ ${ONLY:-.*} ]] || continue
  attention=()
  # shellcheck disable=SC2206  # swap is KIND key=value ...: split on purpose
  [ -n "$swap" ] && attention=(--attention $swap)
  common=(--data "$data" --split test --attention-impl pytorch --json "${attention[@]}")
  native=$($sbtrain eval-ppl "$ckpt" "${common[@]}")
  hf=$($sbtrain eval-ppl "hf:$folder" "${common[@]}")
  $python - "$swap" "$native" "$hf" >>"$out.tmp" <<'PY'
import json, sys
swap, native, hf = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
row = {"swap": swap or "none (its own full attention)", "tokens": native["tokens"],
       "native_ppl": native["ppl"], "hf_ppl": hf["ppl"],
       "rel_diff": abs(hf["ppl"] / native["ppl"] - 1), "hf_tokens": hf["tokens"],
       "native_tokens_per_s": native["tokens_per_s"], "hf_tokens_per_s": hf["tokens_per_s"]}
print(json.dumps(row))
print(f"| {row['swap']} | {row['native_ppl']:.2f} | {row['hf_ppl']:.2f} | {row['rel_diff']:.1e} |",
      file=sys.stderr)
PY
done
mv "$out.tmp" "$out"
echo "| wrote $out"
