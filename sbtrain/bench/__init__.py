"""Benchmarks: programs that measure (time, memory, error) and report JSON, never tests.

Each module has a function returning rows (dicts); `report` prints them as a table and writes
JSON with the machine they ran on, so results can be committed under benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch


def machine(device: torch.device | None = None) -> dict:
    """Where a measurement was made."""
    info = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict]) -> str:
    """Rows as an aligned text table (columns: union of keys, first-seen order)."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def report(name: str, rows: list[dict], out: str | None, meta: dict) -> dict:
    """Print the table; write {"benchmark", "machine", "settings", "rows"} JSON to `out`."""
    result = {"benchmark": name, **meta, "rows": rows}
    print(table(rows), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"| wrote {out}", file=sys.stderr)
    return result
