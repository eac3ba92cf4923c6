"""Benchmarks: programs that measure (time, memory, error) and report JSON, never tests.

Each module has a function returning rows (dicts); `report` prints them as a table and writes
JSON with the machine they ran on, so results can be committed under benchmarks/results/.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import platform
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from sbtrain.errors import UserError
from sbtrain.staging import save_figure, write_json
from sbtrain.tasks import TrainingData, get_task

# The kinds at the WikiText-103 recipes' per-query budget (256 keys or features for length 2048):
# label -> (kind, options). The benchmarks that compare kinds use these.
PAPER_BUDGET: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "local": ("local", {"window": 256}),
    "performer": ("performer", {"n_features": 256}),
    "lsh": ("lsh", {"n_hashes": 2, "bucket_size": 128}),
    "scatterbrain": ("scatterbrain", {"sparse": "local", "window": 128, "n_features": 128}),
}


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, length: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (size, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


def synthetic_data(recipe, vocab_size: int, n_samples: int) -> TrainingData:
    """Stands in for a task's training data: random tokens, no validation set."""
    length = get_task(recipe).context_length
    dataset = RandomTokens(vocab_size, length, n_samples, recipe.train.seed)
    return TrainingData(n_samples, None, lambda epoch: dataset, {"vocab_size": vocab_size})


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


def in_fresh_process(what: str, function, *args):
    """`function(*args)` in a freshly spawned interpreter, so its peak memory is its own.

    A process that dies (killed for memory, typically) is reported as an error naming `what`,
    instead of leaving the benchmark waiting for a result that never comes.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            raise UserError(
                f"the process measuring {what} died, most likely killed for lack of memory "
                "(the kernel log says); measure a smaller size"
            ) from None


def rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


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


# benchmark -> (x, y columns, the columns naming a line): what its PNG plot shows
PLOTS = {
    "attention": ("length", ("ms", "peak_mib"), ("kind",)),
    "approx": ("temperature", ("error",), ("kind", "regime")),
    "approx-checkpoint": ("n_features", ("error",), ("features", "layer")),
    "train": (
        "length",
        ("tokens_per_s", "peak_kib_per_token"),
        ("recipe", "checkpointing", "allocator"),
    ),
    "generate": ("context", ("ms_per_token", "cache_mib"), ("kind",)),
    "train-parallel": (
        "length",
        ("peak_rss_mib", "tokens_per_s"),
        ("attention", "parallel", "context_parallel"),
    ),
}


def report(
    name: str, rows: list[dict], out: str | None, meta: dict, text: str | None = None
) -> dict:
    """Print `text` (default: the rows as a table); write {"benchmark", "machine", "settings",
    "rows"} JSON to `out`, and a PNG plot beside it when matplotlib is installed."""
    result = {"benchmark": name, **meta, "rows": rows}
    print(text or table(rows), flush=True)
    if out:
        write_json(Path(out), result, indent=1)
        print(f"| wrote {out}", file=sys.stderr)
        if name in PLOTS and importlib.util.find_spec("matplotlib") is not None:
            png = Path(out).with_suffix(".png")
            plot(name, rows, png)
            print(f"| wrote {png}", file=sys.stderr)
    return result


def plot(name: str, rows: list[dict], path: Path) -> None:
    """One panel per y column, one line per group, log-log where x is a length."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x, ys, group = PLOTS[name]
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    lines: dict[tuple, list[dict]] = {}
    for row in rows:
        lines.setdefault(tuple(row.get(g) for g in group), []).append(row)
    for ax, y in zip(axes[0], ys):
        for key, members in lines.items():
            members = sorted((r for r in members if r.get(y) is not None), key=lambda r: r[x])
            label = " ".join(str(k) for k in key if k is not None)
            ax.plot([r[x] for r in members], [r[y] for r in members], marker="o", label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"sbtrain bench {name}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
