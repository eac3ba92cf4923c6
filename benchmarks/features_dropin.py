"""Drop-in swap of a full-attention checkpoint's attention for approximations at 64 keys or
features per query, with every feature map, over several draws (attention seeds): test
perplexity mean and std, and the issue-17 goal checks. Writes JSON.

    .venv/bin/python benchmarks/features_dropin.py checkpoints/wiki-leads-full/checkpoint_best.pt \
        --out benchmarks/results/features-dropin-cpu.json

favor++'s statistic is calibrated per layer on the first 4 training blocks (never test data).
Equivalent to `sbtrain eval-ppl CKPT --attention KIND key=value ... --json` for favor+ and
simplex (same seeds, same numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sbtrain.attention.features import FEATURES
from sbtrain.attention.performer import calibrate
from sbtrain.bench import machine
from sbtrain.bench.approx import capture_attention_inputs, split_blocks
from sbtrain.checkpoint import load_model
from sbtrain.scoring import score

BUDGET = 64


def configs() -> dict[str, dict]:
    out = {"full": {"kind": "full"}, "local 64": {"kind": "local", "window": BUDGET}}
    for f in FEATURES:
        out[f"performer 64 {f}"] = {"kind": "performer", "n_features": BUDGET, "features": f}
        out[f"scatterbrain 32+32 {f}"] = {
            "kind": "scatterbrain", "window": 32, "n_features": 32, "features": f,
        }  # fmt: skip
        out[f"window 64 + 64 features {f}"] = {
            "kind": "scatterbrain", "window": BUDGET, "n_features": BUDGET, "features": f,
        }  # fmt: skip
    return out


def test_ppl(path: str, attention: dict | None, seed: int | None) -> float:
    spec = None if attention["kind"] == "full" else {**attention}
    if spec is not None and seed is not None and spec["kind"] != "local":
        spec["seed"] = seed
    model, recipe, task, state = load_model(path, torch.device("cpu"), spec)
    length, vocab = task.context_length, int(state["vocab_size"])
    if spec is not None and spec.get("features") == "favor++":
        blocks = split_blocks(recipe.data.dir, "train", length, 4, vocab)
        for block, (q, k, *_) in zip(model.blocks, capture_attention_inputs(model, blocks)):
            calibrate(block.attn.kernel, q, k)
    dataset, _ = task.eval_set("test", None, 0, length, task.fits(state["model_args"]))
    s = score(model, task, dataset, list(range(len(dataset))), 8, torch.device("cpu"), "fp32")
    return s.ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for label, attention in configs().items():
        random = "n_features" in attention
        seeds = list(range(args.draws)) if random else [None]
        start = time.perf_counter()
        ppls = [test_ppl(args.checkpoint, attention, seed) for seed in seeds]
        row = {"label": label, **attention, "draws": len(ppls), "ppl": ppls,
               "mean": statistics.mean(ppls),
               "std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
               "seconds": time.perf_counter() - start}  # fmt: skip
        rows.append(row)
        print(f"{label:32s} {row['mean']:9.3f} ± {row['std']:.3f}", file=sys.stderr, flush=True)
    mean = {r["label"]: r["mean"] for r in rows}
    full, local = mean["full"], mean["local 64"]
    goals = {}
    for f in FEATURES:
        sb = mean[f"scatterbrain 32+32 {f}"]
        best_baseline = min(local, mean[f"performer 64 {f}"])
        goals[f] = {
            "scatterbrain_loss_vs_full": sb / full - 1,
            "scatterbrain_within_1_percent": sb <= 1.01 * full,
            "scatterbrain_no_worse_than_best_baseline": sb <= best_baseline,
            "window_plus_features_vs_window": mean[f"window 64 + 64 features {f}"] / local - 1,
            "features_never_hurt_the_window": mean[f"window 64 + 64 features {f}"] <= local,
        }
    result = {
        "benchmark": "features-dropin",
        "machine": {**machine(), "note": "2-core CPU (shared)"},
        "checkpoint": args.checkpoint,
        "rows": rows,
        "goals": goals,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(goals, indent=1))


if __name__ == "__main__":
    main()
