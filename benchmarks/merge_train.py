"""Merge `sbtrain bench train` JSONs into one (and its PNG); each row keeps its command's steps
and warmup. `python benchmarks/merge_train.py OUT.json IN.json...`"""

import json
import sys
from pathlib import Path

from sbtrain import bench

out, ins = sys.argv[1], sys.argv[2:]
rows, runs = [], []
for p in ins:
    r = json.loads(Path(p).read_text())
    for row in r["rows"]:
        rows.append({**row, "warmup": r["settings"]["warmup"], "steps": r["settings"]["steps"]})
    runs.append({"from": Path(p).name, "settings": r["settings"], "machine": r["machine"]})
rows.sort(key=lambda r: (r["recipe"], r["length"]))
bench.report(
    "train", rows, out, {"machine": runs[-1]["machine"], "settings": {"merged_from": runs}}
)
