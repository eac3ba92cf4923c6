"""Write a checkpoint as a Hugging Face transformers folder (model code, weights, tokenizer).

examples:
  sbtrain export checkpoints/wt103/checkpoint_best.pt exported/wt103
  sbtrain export checkpoints/wt103/checkpoint_best.pt exported/wt103 --force
then, in Python (sbtrain not needed):
  AutoModelForCausalLM.from_pretrained("exported/wt103", trust_remote_code=True)
  AutoTokenizer.from_pretrained("exported/wt103", trust_remote_code=True)
"""

from __future__ import annotations

import argparse
import json

from sbtrain.export import export


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="an sbtrain language-model checkpoint")
    parser.add_argument("out_dir", help="the folder to write (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing out_dir")
    parser.add_argument(
        "--data", help="preprocessed data folder with the tokenizer (default: data.dir)"
    )
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="export the model without its tokenizer"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def run(args: argparse.Namespace) -> int:
    result = export(
        args.checkpoint,
        args.out_dir,
        force=args.force,
        data_dir=args.data,
        with_tokenizer=not args.no_tokenizer,
    )
    print(json.dumps(result) if args.json else f"| wrote {result['out_dir']}")
    return 0
