"""`sbtrain bench recall CKPT`: the drop-in sweep of a recall model (trained with full attention):
every kind swapped in at each per-query budget of keys or features, a few draws each, scored on
a split: accuracy over the scored positions against the budget, one line per kind, as Zoology
draws its MQAR plots. JSON + PNG.

Budget b (keys or features per query): local, a window of b; performer, b features; lsh, 2 rounds
of b/2; scatterbrain with `sparse: local` split half and half, and 3/4 window + 1/4 features
(where the features come out even); `sparse: lsh`, 2 rounds of b/4 + b/2 features;
`sparse: local+lsh`, a window of b/4 + 1 round of b/4 + b/2 features. Full attention (every key)
is the ceiling. Random kinds are drawn with seeds 0, 1, ...; local has one draw.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from sbtrain import bench
from sbtrain.attention import RANDOM_KINDS
from sbtrain.checkpoint import load_model
from sbtrain.errors import UserError
from sbtrain.scoring import score
from sbtrain.staging import save_figure


def specs(budget: int) -> dict[str, dict]:
    """label -> the attention at `budget` keys or features per query (labels name the split)."""
    b = budget
    out = {
        "full": {"kind": "full"},
        "local": {"kind": "local", "window": b},
        "performer": {"kind": "performer", "n_features": b},
        "lsh": {"kind": "lsh", "n_hashes": 2, "bucket_size": b // 2},
        "scatterbrain local 1/2+1/2": {"kind": "scatterbrain", "sparse": "local",
                                       "window": b // 2, "n_features": b // 2},
        "scatterbrain lsh 1/2+1/2": {"kind": "scatterbrain", "sparse": "lsh", "n_hashes": 2,
                                     "bucket_size": b // 4, "n_features": b // 2},
        "scatterbrain local+lsh": {"kind": "scatterbrain", "sparse": "local+lsh",
                                   "window": b // 4, "n_hashes": 1, "bucket_size": b // 4,
                                   "n_features": b // 2},
    }  # fmt: skip
    if b % 8 == 0:
        out["scatterbrain local 3/4+1/4"] = {
            "kind": "scatterbrain", "sparse": "local", "window": 3 * b // 4, "n_features": b // 4,
        }  # fmt: skip
    return out


def evaluate_spec(path: str, spec: dict, split: str, data_dir: str | None, device) -> dict:
    """Loss, accuracy and exact match of checkpoint `path` with its attention swapped for `spec`."""
    swap = None if spec["kind"] == "full" else spec
    model, _, task, state = load_model(path, device, swap, attention_impl="pytorch")
    length = task.context_length
    dataset, _ = task.eval_set(split, data_dir, 0, length, task.fits(state["model_args"]))
    s = score(model, task, dataset, list(range(len(dataset))), 64, device, "fp32")
    row = {"loss_nats": s.loss_nats, "accuracy": s.accuracy}
    if task.exact_match:
        row["exact_match"] = s.exact_match
    return row


def sweep(path: str, budgets: list[int], draws: int, split: str, data_dir: str | None) -> list:
    """One row per (label, budget, draw)."""
    device = torch.device("cpu")
    rows = []
    for budget in budgets:
        for label, spec in specs(budget).items():
            if label == "full" and budget != budgets[0]:
                continue  # budget-independent: measured once
            seeds = range(draws) if spec["kind"] in RANDOM_KINDS else [None]
            for seed in seeds:
                drawn = spec if seed is None else {**spec, "seed": seed}
                result = evaluate_spec(path, drawn, split, data_dir, device)
                rows.append({"label": label, "budget": budget, "draw": seed, **spec, **result})
                print(f"| {label:28s} b={budget:<4d} draw={seed} acc={result['accuracy']:.4f}",
                      flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation) of the accuracy per (label, budget)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["budget"]), []).append(row["accuracy"])
    return [
        {"label": label, "budget": budget, "draws": len(acc), "accuracy": statistics.mean(acc),
         "spread": statistics.stdev(acc) if len(acc) > 1 else 0.0}
        for (label, budget), acc in groups.items()
    ]  # fmt: skip


def plot(table: list[dict], budgets: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in table):
        points = sorted((r for r in table if r["label"] == label), key=lambda r: r["budget"])
        if label == "full":
            ax.axhline(points[0]["accuracy"], color="black", linestyle=":", label="full")
            continue
        x = [r["budget"] for r in points]
        y = [r["accuracy"] for r in points]
        ax.errorbar(x, y, yerr=[r["spread"] for r in points], marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="keys or features per query", ylabel="accuracy (scored positions)",
           ylim=(0, 1.02), title=title)  # fmt: skip
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(
    checkpoint: str,
    budgets: list[int] = (4, 8, 16, 32),
    draws: int = 3,
    split: str = "valid",
    data: str | None = None,
    out: str | None = None,
) -> dict:
    if any(b < 4 or b % 4 for b in budgets):
        raise UserError(f"--budgets {list(budgets)}: use multiples of 4 (the splits divide by 4)")
    rows = sweep(checkpoint, list(budgets), draws, split, data)
    table = summary(rows)
    meta = {"machine": bench.machine(), "settings": {"checkpoint": checkpoint, "budgets":
            list(budgets), "draws": draws, "split": split}, "summary": table}  # fmt: skip
    result = bench.report("recall", rows, out, meta, text=bench.table(table))
    if out:
        png = Path(out).with_suffix(".png")
        plot(table, list(budgets), png, f"drop-in into {Path(checkpoint).parent.name} ({split})")
    return result
