r"""Perplexity of a checkpoint on a split (copy task: loss and accuracy on the copied half;
classifiers: loss and accuracy per example).

examples:
  sbtrain eval-ppl checkpoints/wt103/checkpoint_best.pt
  sbtrain eval-ppl checkpoints/wt103/checkpoint_best.pt --split valid --context-window 1024 --json
  sbtrain eval-ppl checkpoints/wt103-full/checkpoint_best.pt \
      --attention scatterbrain sparse=local window=128 n_features=128
  sbtrain eval-ppl checkpoints/wiki-leads-rope/checkpoint_best.pt \
      --tokens-per-sample 2048 --by-position 128 --plot ppl-by-position.png
  sbtrain eval-ppl checkpoints/lra/listops-cpu/checkpoint_best.pt --json   # a classifier
  sbtrain eval-ppl hf:models/gpt2 --data data/wiki-gpt2-bin \
      --attention scatterbrain window=128 n_features=128   # a transformers causal LM
"""

from __future__ import annotations

import argparse
import json

from cli.flags import add_model_flags, parse_attention
from sbtrain import evaluate


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_flags(
        parser,
        "an sbtrain checkpoint, e.g. checkpoints/wt103/checkpoint_best.pt, or hf:FOLDER, a "
        "transformers causal LM (with --data: a split prepared with data.tokenizer: hf:FOLDER)",
        "evaluate",
    )
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument(
        "--context-window",
        type=int,
        default=0,
        metavar="C",
        help="score each block with up to C earlier tokens as context (fairseq's meaning)",
    )
    parser.add_argument(
        "--tokens-per-sample",
        type=int,
        metavar="N",
        help="score blocks of N tokens (default: the training length; hf:FOLDER: the model's "
        "context, at most 2048 without a position table; learned positions: at most their table)",
    )
    parser.add_argument(
        "--by-position",
        type=int,
        metavar="K",
        help="also report perplexity per bucket of K positions within the block",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="with --by-position: a PNG of perplexity by position"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    return parser


def run(args: argparse.Namespace) -> int:
    result = evaluate.main(
        args.checkpoint,
        split=args.split,
        context_window=args.context_window,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        attention=parse_attention(args.attention),
        data_dir=args.data,
        attention_impl=args.attention_impl,
        progress=not args.json,
        tokens_per_sample=args.tokens_per_sample,
        by_position=args.by_position,
        plot=args.plot,
    )
    print(json.dumps(result) if args.json else evaluate.format_result(result))
    return 0
