"""Sample a continuation of a prompt from a checkpoint.

examples:
  sbtrain generate checkpoints/wt103/checkpoint_best.pt --prompt "The history of" --max-tokens 100
  sbtrain generate checkpoints/wt103/checkpoint_best.pt --prompt "In 1990" --top-p 0.9 --seed 3
  sbtrain generate checkpoints/copy-demo/checkpoint_best.pt --prompt "0 5 9 2 7 0" --temperature 0
"""

from __future__ import annotations

import argparse
import json

from cli.flags import add_model_flags, parse_attention
from sbtrain import generate


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_flags(parser, "an sbtrain checkpoint", "decode")
    parser.add_argument("--prompt", required=True, help="text to continue (copy task: symbol ids)")
    parser.add_argument("--max-tokens", type=int, default=50, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest (0: all)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def run(args: argparse.Namespace) -> int:
    result = generate.main(
        args.checkpoint,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        attention=parse_attention(args.attention),
        data_dir=args.data,
        attention_impl=args.attention_impl,
    )
    print(json.dumps(result) if args.json else result["text"])
    return 0
