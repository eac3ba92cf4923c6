#!/usr/bin/env bash
# Unpack a downloaded WikiText-103 archive into data/wikitext-103/ for `sbtrain preprocess`.
#
#   data/prepare-wikitext-103.sh PATH_TO_ZIP [DEST]     (DEST defaults to data/wikitext-103)
#
# Accepts wikitext-103-v1.zip (wiki.*.tokens) or wikitext-103-raw-v1.zip (wiki.*.raw); both can
# be unpacked into the same DEST (preprocess then prefers the .tokens files). Nothing is
# downloaded here. Exit status 2 for a missing or wrong archive; DEST is only written once the
# archive has been checked and unpacked completely.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

fail() {
    echo "prepare-wikitext-103: error: $*" >&2
    exit 2
}

if [[ $# -lt 1 || $# -gt 2 ]]; then
    cat <<'EOF'
usage: data/prepare-wikitext-103.sh PATH_TO_ZIP [DEST]

WikiText-103 (Merity et al., 2016; CC BY-SA) is not downloaded by this script. Get one of
  wikitext-103-v1.zip       tokenized text, wiki.{train,valid,test}.tokens (what papers report on)
  wikitext-103-raw-v1.zip   raw text, wiki.{train,valid,test}.raw
originally published at https://s3.amazonaws.com/research.metamind.io/wikitext/ (if that no
longer answers, use a mirror of the same file name), then run this script on it.
EOF
    exit 2
fi

zip="$1"
dest="${2:-$here/wikitext-103}"
[[ -f "$zip" ]] || fail "$zip: archive not found"
python=$(command -v python3 || command -v python) || fail "python3 is needed to read the archive"
unzip_py() {  # python's zipfile, so no unzip binary is needed: list | extract DEST NAME...
    "$python" - "$zip" "$@" <<'PY'
import sys, zipfile
archive, action, *rest = sys.argv[1:]
with zipfile.ZipFile(archive) as z:
    if action == "list":
        print("\n".join(z.namelist()))
    else:
        z.extractall(rest[0], members=rest[1:])
PY
}

# The archive's top folder tells the two variants apart.
listing="$(unzip_py list 2>/dev/null)" || fail "$zip: not a zip archive"
if grep -qx 'wikitext-103/wiki.train.tokens' <<<"$listing"; then
    folder=wikitext-103 suffix=tokens
elif grep -qx 'wikitext-103-raw/wiki.train.raw' <<<"$listing"; then
    folder=wikitext-103-raw suffix=raw
else
    fail "$zip: not a WikiText-103 archive (expected wikitext-103/wiki.train.tokens or wikitext-103-raw/wiki.train.raw inside)"
fi
files=()
for split in train valid test; do
    name="$folder/wiki.$split.$suffix"
    grep -qx "$name" <<<"$listing" || fail "$zip: $name is missing from the archive"
    files+=("$name")
done

# Unpack beside DEST, then move the three files in: an interrupted unzip leaves DEST untouched.
mkdir -p "$(dirname "$dest")"
staging="$(mktemp -d "$(dirname "$dest")/.wikitext-103.tmp-XXXXXX")"
trap 'rm -rf "$staging"' EXIT
unzip_py extract "$staging" "${files[@]}" || fail "$zip: unpacking failed"
mkdir -p "$dest"
for name in "${files[@]}"; do
    mv -f "$staging/$name" "$dest/"
done

# WikiText-103's line counts; a mismatch is worth a warning, not a refusal.
declare -A expected=([train]=1801350 [valid]=3760 [test]=4358)
for split in train valid test; do
    lines=$(wc -l <"$dest/wiki.$split.$suffix")
    if [[ "$lines" -ne "${expected[$split]}" ]]; then
        echo "note: wiki.$split.$suffix has $lines lines; WikiText-103 has ${expected[$split]}" >&2
    fi
done

echo "unpacked wiki.{train,valid,test}.$suffix into $dest"
echo "next:"
echo "  sbtrain preprocess data.raw=$dest data.dir=$dest-bin data.workers=$(nproc 2>/dev/null || echo 4)"
