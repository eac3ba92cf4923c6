"""The README table (markdown, to stdout) and PNG of benchmarks/length-generalisation.sh.

    python3 benchmarks/length_generalisation.py benchmarks/results/length-generalisation-cpu.jsonl \
        --png benchmarks/results/length-generalisation-cpu.png

Table: per model (kind, positions) its training time and test perplexity at each evaluated
length, then, at the longest length, the perplexity of the first block of positions it was
trained on and of the last bucket. PNG: perplexity by position at the longest length, one line
per kind, one panel per position encoding (matplotlib needed for the PNG only).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the JSON lines the script wrote")
    parser.add_argument("--png", help="where to draw perplexity by position")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
    models = defaultdict(dict)  # (kind, positions) -> {length: record}
    for r in rows:
        models[(r["kind"], r["positions"])][r["tokens_per_sample"]] = r
    lengths = sorted({r["tokens_per_sample"] for r in rows})
    longest, trained = lengths[-1], rows[0]["trained_tokens_per_sample"]
    head = ["kind", "positions", "train s"] + [f"ppl @{n}" for n in lengths]
    head += [f"@{longest}: positions < {trained}", f"@{longest}: last 128"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (kind, positions), by_length in models.items():
        last = by_length[longest]["by_position"]
        seen = [b for b in last if b["end"] <= trained]  # buckets inside the training length
        tokens = sum(b["tokens"] for b in seen)
        inside = sum(b["loss_nats"] * b["tokens"] for b in seen) / tokens if tokens else None
        cells = [kind, positions, f"{by_length[lengths[0]]['train_seconds']:.0f}"]
        cells += [f"{by_length[n]['ppl']:.1f}" for n in lengths]
        cells += ["-" if inside is None else f"{math.exp(inside):.1f}", f"{last[-1]['ppl']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    if args.png:
        draw(models, longest, trained, args.png)


def draw(models: dict, longest: int, trained: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encodings = sorted({positions for _, positions in models})
    fig, axes = plt.subplots(1, len(encodings), figsize=(6 * len(encodings), 4), sharey=True)
    axes = [axes] if len(encodings) == 1 else axes
    for ax, encoding in zip(axes, encodings):
        for (kind, positions), by_length in models.items():
            if positions == encoding:
                buckets = by_length[longest]["by_position"]
                middles = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
                ax.plot(middles, [b["ppl"] for b in buckets], marker=".", label=kind)
        ax.axvline(trained, color="grey", linestyle=":", label="training length")
        ax.set(xlabel="position in the block", yscale="log", title=f"{encoding}, {longest} tokens")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test perplexity (buckets of 128 positions)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
