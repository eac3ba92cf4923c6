"""Tasks: what to preprocess, train on and score, one class per `recipe.task`, from one dict.

    task = TASKS[recipe.task](recipe)
    task.preprocess(inputs, force)            # sbtrain preprocess: write data.dir
    data = task.training_data()               # .n_train, .valid, .train_set(epoch), .model_args
    model = task.build_model(**data.model_args)
    *inputs, targets = task.collate([dataset[i] for i in batch])
    nll = model.token_nll(model(*inputs), targets)      # (N,) nats of the scored targets

The trainer, the evaluator and checkpoints go through this interface only. Every model has
`forward(*inputs) -> outputs`, `token_nll(outputs, targets) -> (N,)` and `predict(outputs)`; a
target of IGNORE is not scored. Language models score tokens; classifiers score examples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sbtrain.config import Recipe
from sbtrain.errors import UserError


@dataclass
class TrainingData:
    """The training and validation samples of a recipe, and the model's data-given sizes."""

    n_train: int
    valid: Any  # a dataset, or None
    train_sets: Any  # epoch -> dataset
    model_args: dict = field(default_factory=dict)  # keyword arguments of Task.build_model

    @property
    def vocab_size(self) -> int:
        return int(self.model_args["vocab_size"])

    def train_set(self, epoch: int):
        return self.train_sets(epoch)


class Task:
    """One kind of task; subclasses fill in the data, the model and what is scored."""

    name: ClassVar[str]
    causal: ClassVar[bool] = True  # attention of its model
    unit: ClassVar[str] = "tokens"  # what one scored target is
    counts_correct: ClassVar[bool] = False  # report accuracy (argmax hits) beside the loss
    architecture: ClassVar[tuple[str, ...]] = (  # model.* keys a checkpoint must match
        "n_layers", "n_heads", "d_model", "d_ff", "positions", "attention",
    )  # fmt: skip

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @staticmethod
    def contradictions(recipe: Recipe) -> list[tuple[str, str]]:
        """(key, why) of each setting this task cannot take (checked with the recipe)."""
        return []

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        raise NotImplementedError

    def training_data(self) -> TrainingData:
        raise NotImplementedError

    def build_model(self, **model_args) -> nn.Module:
        raise NotImplementedError

    def collate(self, samples: list) -> tuple[torch.Tensor, ...]:
        from sbtrain.datasets import collate

        return collate(samples)

    def eval_options(self, context_window: int, tokens_per_sample: int | None, by_position) -> None:
        """Refuse evaluation options the task has no meaning for (UserError)."""

    def eval_set(self, split: str, state: dict, data_dir: str | None, context_window: int, length):
        """The samples to score and the split's stats (or None)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# language modelling and the copy task


class LanguageModelling(Task):
    name = "lm"
    architecture = (
        "n_layers", "n_heads", "d_model", "d_ff", "positions", "output", "adaptive_cutoffs",
        "adaptive_div_value", "attention",
    )  # fmt: skip

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        from sbtrain.binarize import preprocess

        return preprocess(self.recipe.data, inputs=inputs, force=force, log=log)

    def build_model(self, vocab_size: int) -> nn.Module:
        from sbtrain.model import TransformerLM

        return TransformerLM(self.recipe.model, vocab_size, self.recipe.context_length)

    def training_data(self) -> TrainingData:
        from sbtrain.datasets import LMBlocks, open_split

        recipe = self.recipe
        tokens, meta = open_split(recipe.data.dir, "train")
        vocab_size, eol_id = int(meta["vocab_size"]), int(meta["eol_id"])
        length = recipe.data.tokens_per_sample
        if len(tokens) < length:
            raise UserError(
                f"data.tokens_per_sample={length} is longer than the training data "
                f"({len(tokens)} tokens in {recipe.data.dir}/train.bin); lower it"
            )
        blocks = LMBlocks(tokens, eol_id, length)
        valid = None
        if (Path(recipe.data.dir) / "valid.bin").is_file():
            valid_tokens, _ = open_split(recipe.data.dir, "valid")
            valid = LMBlocks(valid_tokens, eol_id, length, drop_last=False)
        return TrainingData(len(blocks), valid, lambda epoch: blocks, {"vocab_size": vocab_size})

    def block_length(self, model: nn.Module, tokens_per_sample: int | None) -> int:
        """Input tokens per scored block: --tokens-per-sample, or the training length."""
        if tokens_per_sample is None:
            return self.recipe.context_length
        if tokens_per_sample < 1:
            raise UserError(f"--tokens-per-sample {tokens_per_sample}: must be at least 1")
        if model.cfg.positions == "learned" and tokens_per_sample > model.max_len:
            raise UserError(
                f"--tokens-per-sample {tokens_per_sample}: the model has {model.max_len} "
                "learned positions; use at most "
                f"{model.max_len} (sinusoidal and rope models take any length)"
            )
        return tokens_per_sample

    def eval_set(self, split: str, state: dict, data_dir: str | None, context_window: int, length):
        """Blocks of `length` input tokens and the split's stats (words and lines)."""
        from sbtrain.datasets import LMBlocks, open_split

        if not 0 <= context_window < length:
            raise UserError(
                f"--context-window {context_window}: must be in [0, {length}) "
                f"(the blocks hold {length} tokens: data.tokens_per_sample or --tokens-per-sample)"
            )
        folder = data_dir or self.recipe.data.dir
        tokens, meta = open_split(folder, split)
        if int(meta["vocab_size"]) != int(state["vocab_size"]):
            raise UserError(
                f"{folder} has a vocabulary of {meta['vocab_size']}, the model "
                f"{state['vocab_size']}: give the folder it was trained on with --data"
            )
        dataset = LMBlocks(
            tokens, int(meta["eol_id"]), length - context_window, context=context_window,
            drop_last=False,
        )  # fmt: skip
        stats_path = Path(folder) / f"{split}.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        return dataset, {**stats, "tokenizer": meta.get("tokenizer")}


class Copy(LanguageModelling):
    """`0 w 0 w` sequences made on the fly: fresh ones every epoch, fixed valid and test."""

    name = "copy"
    counts_correct = True

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        raise UserError("the copy task makes its samples while training: nothing to preprocess")

    def training_data(self) -> TrainingData:
        from sbtrain.datasets import CopyTask, copy_split

        r = self.recipe
        c = r.copy

        def train_set(epoch: int):
            return CopyTask(c.n_symbols, c.length, c.train_size, r.train.seed, epoch)

        model_args = {"vocab_size": c.n_symbols + 1}
        return TrainingData(c.train_size, copy_split(r, "valid"), train_set, model_args)

    def block_length(self, model: nn.Module, tokens_per_sample: int | None) -> int:
        if tokens_per_sample is not None:
            raise UserError("--tokens-per-sample: copy samples have a fixed length (copy.length)")
        return self.recipe.context_length

    def eval_set(self, split: str, state: dict, data_dir: str | None, context_window: int, length):
        from sbtrain.datasets import copy_split

        return copy_split(self.recipe, split), None


# ---------------------------------------------------------------------------------------------
# Long Range Arena classifiers


class Documents(torch.utils.data.Dataset):
    """Examples of a classification split: (tokens int64, label) or (tokens, tokens, label)."""

    def __init__(self, split, streams: int):
        self.split, self.streams = split, streams

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple:
        docs = [
            torch.from_numpy(np.asarray(self.split.document(i, s), dtype=np.int64))
            for s in range(self.streams)
        ]
        return (*docs, int(self.split.labels[i]))


class Classification(Task):
    """A document -> one of `num_classes`, read from an sbtrain-cls-1 folder (sbtrain.lra)."""

    causal = False
    unit = "examples"
    counts_correct = True
    architecture = (*Task.architecture, "pooling")
    streams: ClassVar[int] = 1

    @staticmethod
    def contradictions(recipe: Recipe) -> list[tuple[str, str]]:
        if recipe.model.output == "softmax":
            return []
        why = (
            f"{recipe.model.output} is for language models; a {recipe.task} classifier has an "
            "MLP head: leave model.output at softmax"
        )
        return [("model.output", why)]

    # -- preprocess -----------------------------------------------------------------------------

    def write(self, folder: Path, workers: int) -> dict:
        """Write the task's splits into `folder` (a fresh, empty one)."""
        raise NotImplementedError

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        from sbtrain import binarize

        if any(inputs.values()):
            raise UserError(
                f"--trainpref/--validpref/--testpref are for language models; the {self.name} "
                "task reads data.raw (or generates its data)"
            )
        data = self.recipe.data
        target = Path(os.path.abspath(data.dir))
        raw = {"raw": Path(os.path.abspath(data.raw))} if data.raw else {}
        binarize._check_target(target, raw, force)
        with binarize._sigterm_as_exit(), binarize._staging(target, force) as staging:
            stats = self.write(staging, data.workers)
        for split, s in stats.items():
            log(
                f"| [{split}] {s.examples} examples, {s.tokens} tokens, lengths "
                f"{s.min_length}..{s.max_length} (mean {s.mean_length}), classes {s.label_counts}"
            )
        log(f"| wrote {data.dir}")
        return stats

    # -- data and model -------------------------------------------------------------------------

    def _open(self, split: str, data_dir: str | None = None):
        from sbtrain.lra.format import open_split

        folder = data_dir or self.recipe.data.dir
        split = open_split(folder, split)
        if split.meta["task"] != self.name:
            raise UserError(
                f"{folder} holds {split.meta['task']} data, the recipe is {self.name}: point "
                f"data.dir at a {self.name} folder"
            )
        self._pad_id = int(split.meta["pad_id"])
        longest = max(int(split.lengths(s).max(initial=0)) for s in range(self.streams))
        limit = self.recipe.data.tokens_per_sample
        if longest > limit:
            raise UserError(
                f"data.tokens_per_sample={limit} is shorter than the longest document of "
                f"{split.name} ({longest} tokens in {folder}); "
                f"raise it to {longest}"
            )
        return split

    def model_args(self, meta: dict) -> dict:
        keys = ("vocab_size", "num_classes", "pad_id", "cls_id")
        return {key: int(meta[key]) for key in keys}

    def training_data(self) -> TrainingData:
        train = self._open("train")
        names = train.meta["splits"]
        valid_name = "valid" if "valid" in names else ("test" if "test" in names else None)
        valid = None
        if valid_name is not None:
            valid = Documents(self._open(valid_name), self.streams)
        docs = Documents(train, self.streams)
        return TrainingData(len(docs), valid, lambda epoch: docs, self.model_args(train.meta))

    def build_model(self, vocab_size, num_classes, pad_id, cls_id) -> nn.Module:
        from sbtrain.classifier import Classifier, DualEncoderClassifier

        cls = DualEncoderClassifier if self.streams == 2 else Classifier
        length = self.recipe.data.tokens_per_sample
        return cls(self.recipe.model, vocab_size, num_classes, length, pad_id, cls_id)

    def collate(self, samples: list) -> tuple[torch.Tensor, ...]:
        """(tokens, lengths) per document stream, padded to the batch's longest; then labels."""
        from sbtrain.classifier import pad

        pad_id = self.pad_id
        out = []
        for s in range(self.streams):
            out += pad([sample[s] for sample in samples], pad_id)
        return (*out, torch.tensor([sample[-1] for sample in samples], dtype=torch.long))

    @property
    def pad_id(self) -> int:
        from sbtrain.lra.format import read_meta

        if not hasattr(self, "_pad_id"):
            self._pad_id = int(read_meta(self.recipe.data.dir)["pad_id"])
        return self._pad_id

    # -- evaluation -----------------------------------------------------------------------------

    def eval_options(self, context_window: int, tokens_per_sample: int | None, by_position) -> None:
        for flag, value in (
            ("--context-window", context_window or None),
            ("--tokens-per-sample", tokens_per_sample),
            ("--by-position", by_position),
        ):
            if value is not None:
                raise UserError(f"{flag} is for language models; a {self.name} classifier "
                                "scores whole documents")  # fmt: skip

    def block_length(self, model: nn.Module, tokens_per_sample: int | None) -> int:
        return self.recipe.data.tokens_per_sample

    def eval_set(self, split: str, state: dict, data_dir: str | None, context_window: int, length):
        if data_dir is not None:
            self.recipe = _with_data_dir(self.recipe, data_dir)
        docs = self._open(split)
        args = self.model_args(docs.meta)
        if args != state.get("model_args"):
            raise UserError(
                f"{self.recipe.data.dir} does not match the model (vocabulary, classes or "
                "special ids differ): give the folder it was trained on with --data"
            )
        return Documents(docs, self.streams), None


def _with_data_dir(recipe: Recipe, data_dir: str) -> Recipe:
    import dataclasses

    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dir=data_dir))


class ListOps(Classification):
    name = "listops"

    @staticmethod
    def contradictions(recipe: Recipe) -> list[tuple[str, str]]:
        from sbtrain.lra.listops import ListOpsConfig

        try:
            ListOpsConfig(**recipe.listops.options())
        except ValueError as e:
            return [("listops", str(e).split(", got")[0])]
        return Classification.contradictions(recipe)

    def write(self, folder: Path, workers: int) -> dict:
        from sbtrain.lra import listops

        try:
            return listops.prepare(folder, listops.ListOpsConfig(**self.recipe.listops.options()),
                                   workers)  # fmt: skip
        except ValueError as e:
            raise UserError(f"{e}".replace("ListOpsConfig", "listops settings")) from None


class Pathfinder(Classification):
    name = "pathfinder"

    @staticmethod
    def contradictions(recipe: Recipe) -> list[tuple[str, str]]:
        from sbtrain.lra.pathfinder import PathfinderConfig

        try:
            PathfinderConfig(**recipe.pathfinder.options())
        except ValueError as e:
            return [("pathfinder", str(e).split(", got")[0])]
        return Classification.contradictions(recipe)

    def write(self, folder: Path, workers: int) -> dict:
        from sbtrain.lra import pathfinder

        config = pathfinder.PathfinderConfig(**self.recipe.pathfinder.options())
        return pathfinder.prepare(folder, config, workers)


class _Reader(Classification):
    """Tasks read from files users download (data.raw)."""

    reader: ClassVar[str]

    def write(self, folder: Path, workers: int) -> dict:
        from sbtrain.lra import readers

        raw = self.recipe.data.raw
        if raw is None:
            raise UserError(
                f"data.raw: set it to the downloaded {self.name} data (see data/README.md)"
            )
        return getattr(readers, self.reader)(folder, raw)


class Text(_Reader):
    name, reader = "text", "prepare_text"


class Image(_Reader):
    name, reader = "image", "prepare_image"


class Retrieval(_Reader):
    name, reader, streams = "retrieval", "prepare_retrieval", 2


TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (LanguageModelling, Copy, ListOps, Pathfinder, Text, Image, Retrieval)
}


def get_task(recipe: Recipe) -> Task:
    return TASKS[recipe.task](recipe)
