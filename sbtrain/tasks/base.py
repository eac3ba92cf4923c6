"""The interface every task fills in, and what it hands the trainer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sbtrain.batch import collate
from sbtrain.config import Recipe, Schema
from sbtrain.errors import UserError

Fits = Callable[[str, dict], None]  # (data folder, its meta.json): a UserError if the model can't


@dataclass
class TrainingData:
    """The training and validation samples of a recipe, and the model's data-given sizes."""

    n_train: int
    valid: Any  # a dataset, or None
    train_sets: Callable[[int], Any]  # epoch -> dataset
    model_args: dict = field(default_factory=dict)  # keyword arguments of Task.build_model

    @property
    def vocab_size(self) -> int:
        return int(self.model_args["vocab_size"])

    def train_set(self, epoch: int):
        return self.train_sets(epoch)


class Task:
    """One kind of task: its recipe's shape, its data, its model and what it scores.

    Every model has `forward(*inputs) -> outputs`, `token_nll(outputs, targets) -> (N,)` nats of
    the scored targets and `predict(outputs)`; a target of IGNORE is not scored.
    """

    name: ClassVar[str]
    schema: ClassVar[Schema]  # the classes of the recipe's data, model and own sections
    causal: ClassVar[bool] = True  # attention of its model
    unit: ClassVar[str] = "tokens"  # what one scored target is
    counts_correct: ClassVar[bool] = False  # report accuracy (argmax hits) beside the loss
    exact_match: ClassVar[bool] = False  # and the fraction of samples with every target right

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    # -- the recipe -----------------------------------------------------------------------------

    @classmethod
    def contradictions(cls, recipe: Recipe) -> Iterator[tuple[str, str]]:
        """(dotted key, why) of each setting this task cannot take with the others."""
        return iter(())

    @classmethod
    def architecture(cls) -> tuple[str, ...]:
        """model.* keys a checkpoint must match to be resumed (all but dropout)."""
        return tuple(f.name for f in fields(cls.schema.model) if f.name != "dropout")

    @property
    def best_metric(self) -> str:
        """What checkpoint_best.pt follows: train.best_checkpoint_metric, else accuracy where
        the task counts correct predictions (as classifiers are chosen), else loss."""
        chosen = self.recipe.train.best_checkpoint_metric
        return chosen or ("accuracy" if self.counts_correct else "loss")

    @property
    def context_length(self) -> int:
        """Tokens the model sees per sample (its learned position table's size)."""
        return self.recipe.data.tokens_per_sample

    # -- preprocess, train ---------------------------------------------------------------------

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        raise UserError(f"the {self.name} task makes its samples while training: nothing to do")

    def training_data(self) -> TrainingData:
        raise NotImplementedError

    def build_model(self, **model_args) -> nn.Module:
        raise NotImplementedError

    def collate(self, samples: list) -> tuple[torch.Tensor, ...]:
        """Samples -> the model's inputs, then the targets."""
        return collate(samples)

    # -- evaluation -------------------------------------------------------------------------------

    def eval_options(self, context_window: int, tokens_per_sample: int | None, by_position) -> None:
        """Refuse evaluation options the task has no meaning for (UserError)."""

    def block_length(self, tokens_per_sample: int | None, limit: int | None) -> int:
        """Input tokens per scored sample: the training length unless the task takes another."""
        if tokens_per_sample is not None:
            raise UserError(f"--tokens-per-sample: {self.name} samples have a fixed length")
        return self.context_length

    def eval_set(
        self, split: str, folder: str | None, context_window: int, length: int, fits: Fits
    ):
        """The samples of `split` to score (from `folder`, default data.dir, after `fits` has
        accepted its meta.json) and the split's statistics (or None)."""
        raise NotImplementedError

    def model_args(self, meta: dict) -> dict:
        """The keyword arguments of `build_model` that a data folder's meta.json gives."""
        return {"vocab_size": int(meta["vocab_size"])}

    def fits(self, model_args: dict) -> Fits:
        """The check that a data folder holds what a model built with `model_args` reads."""

        def check(folder: str, meta: dict) -> None:
            mine = self.model_args(meta)
            for key, value in mine.items():
                if model_args.get(key) != value:
                    raise UserError(
                        f"{folder} does not match the model ({key} {value} in the data, "
                        f"{model_args.get(key)} in the model): give the folder it was trained "
                        "on with --data"
                    )

        return check


def split_stats(folder: str | Path, split: str) -> dict:
    """`{split}.json` of a preprocessed folder (empty when there is none)."""
    path = Path(folder) / f"{split}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
