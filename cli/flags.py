"""Flags several commands share, defined once: the model to load (`eval-ppl`, `generate`) and
`--attention KIND key=value ...`, parsed into the options `build_attention` takes."""

from __future__ import annotations

import argparse

import yaml

from sbtrain.errors import UserError


def add_model_flags(parser: argparse.ArgumentParser, checkpoint_help: str, verb: str) -> None:
    """The checkpoint argument and --attention, --attention-impl, --data, --device."""
    parser.add_argument("checkpoint", help=checkpoint_help)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--attention",
        nargs="+",
        metavar="KIND|key=value",
        help=f"{verb} with another attention kind, e.g. --attention local window=256",
    )
    parser.add_argument(
        "--attention-impl",
        choices=["auto", "pytorch", "fused"],
        help="fused kernels or PyTorch path (default: the checkpoint's train.attention_impl)",
    )
    parser.add_argument("--data", help="preprocessed data folder (default: the recipe's data.dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def parse_attention(words: list[str] | None) -> dict | None:
    """`--attention KIND key=value ...` -> {"kind": KIND, key: value}, values read as YAML."""
    if not words:
        return None
    spec = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise UserError(f"--attention: expected key=value after the kind, got {word!r}")
        try:
            spec[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--attention: {word!r} is not key=value with a YAML value") from None
    return spec
