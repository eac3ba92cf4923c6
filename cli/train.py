r"""Train a model; rerunning the same command resumes from {save_dir}/checkpoint_last.pt.

examples:
  sbtrain train recipes/wt103.yaml
  sbtrain train recipes/debug.yaml train.max_updates=50 "model.attention={kind: local, window: 16}"
  sbtrain train recipes/wt103.yaml train.save_dir=checkpoints/ft \
      --restore-file checkpoints/wt103/checkpoint_best.pt --reset-optimizer --reset-dataloader
  torchrun --standalone --nproc_per_node=2 -m sbtrain train recipes/debug.yaml    # DDP
"""

from __future__ import annotations

import argparse
import sys

from sbtrain import trainer
from sbtrain.tasks import load_recipe


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/debug.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. train.max_updates=10"
    )
    parser.add_argument(
        "--restore-file", help="start from this checkpoint instead of checkpoint_last.pt"
    )
    parser.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="fresh optimizer, schedule, loss scale, counters",
    )
    parser.add_argument("--reset-dataloader", action="store_true", help="start the data order anew")
    return parser


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        trainer.main(recipe, args.restore_file, args.reset_optimizer, args.reset_dataloader)
    except trainer.Stopped as e:
        print(f"sbtrain train: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0
