"""Tokenize raw text and write binarized splits (token ids, stats, tokenizer) into data.dir.

Reads wiki.{train,valid,test}.tokens from data.raw (or .raw where there is no .tokens), fits
the tokenizer on train (word | sentencepiece | bpe) or loads an existing one, and writes
{split}.bin, {split}.json, meta.json and the tokenizer file. Flags override the recipe; put
key=value overrides right after the recipe.

examples:
  sbtrain preprocess recipes/wt103.yaml
  sbtrain preprocess recipes/wt103.yaml data.tokenizer=sentencepiece data.dir=data/wt103-spm
  sbtrain preprocess --trainpref data/wikitext-103/wiki.train.tokens \\
      --validpref data/wikitext-103/wiki.valid.tokens \\
      --testpref data/wikitext-103/wiki.test.tokens --destdir data/wikitext-103-bin --workers 8
  sbtrain preprocess recipes/wt103.yaml --srcdict data/wikitext-103-bin/dict.txt --destdir data/x
  sbtrain preprocess recipes/lra/listops-cpu.yaml      # LRA tasks: generated or read from data.raw
"""

from __future__ import annotations

import argparse

from sbtrain import preprocess


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("recipe", nargs="?", help="YAML recipe (optional with the flags below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.workers=8")
    for split in ("train", "valid", "test"):
        parser.add_argument(f"--{split}pref", metavar="FILE", help=f"{split} text (not data.raw)")
    parser.add_argument("--destdir", metavar="DIR", help="output folder (data.dir)")
    parser.add_argument("--workers", type=int, help="binarization processes (data.workers)")
    parser.add_argument("--vocab-size", type=int, help="cap (word) or target size (subword)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--tokenizer", help="word | sentencepiece | bpe, or a model file")
    model.add_argument("--srcdict", metavar="DICT", help="use this fairseq dict.txt (word)")
    model.add_argument("--tokenizer-model", metavar="FILE", help="use this spm.model / .json")
    parser.add_argument("--force", action="store_true", help="replace an existing data.dir")
    return parser


def run(args: argparse.Namespace) -> int:
    flags = {flag: getattr(args, flag) for flag in preprocess.FLAGS}
    inputs = {"train": args.trainpref, "valid": args.validpref, "test": args.testpref}
    preprocess.main(args.recipe, args.overrides, flags, inputs, args.force)
    return 0
