"""`sbtrain preprocess`: a recipe (or none), its overrides and fairseq-style flags, read as one
recipe, then the task writes its data folder (sbtrain.binarize for text, sbtrain.lra, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from sbtrain.config import apply_overrides, read_tree
from sbtrain.tasks import get_task, recipe_from_dict

FLAGS = {  # fairseq-style flag -> the data field it sets
    "destdir": "dir",
    "workers": "workers",
    "tokenizer": "tokenizer",
    "vocab_size": "vocab_size",
    "srcdict": "tokenizer",
    "tokenizer_model": "tokenizer",
}


def main(
    recipe: str | None,
    overrides: list[str],
    flags: Mapping[str, object],
    inputs: Mapping[str, str | None],
    force: bool = False,
) -> dict:
    """The recipe (or defaults), its overrides, then the `flags` (see FLAGS; None = not given),
    validated as one; then the task's preprocessing. Returns its statistics per split."""
    overrides = list(overrides)
    if recipe is not None and "=" in recipe:  # no recipe, overrides only
        overrides.insert(0, recipe)
        recipe = None
    tree = read_tree(recipe, overrides) if recipe else apply_overrides({}, overrides)
    given = {FLAGS[flag]: value for flag, value in flags.items() if value is not None}
    if given:
        tree["data"] = {**(tree.get("data") or {}), **given}
    resolved = recipe_from_dict(tree, source=recipe or "command line")
    return get_task(resolved).preprocess(dict(inputs), force)
