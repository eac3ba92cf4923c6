"""Long Range Arena classifiers: a document (or a pair) -> one of `num_classes`, read from an
sbtrain-cls-1 folder (sbtrain.lra) that preprocess generates or reads from downloaded files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from sbtrain.batch import pad
from sbtrain.classifier import Classifier, DualEncoderClassifier
from sbtrain.config import DataConfig, EncoderConfig, Schema
from sbtrain.errors import UserError
from sbtrain.lra import listops, pathfinder, readers
from sbtrain.lra.format import open_split, read_meta
from sbtrain.staging import check_target, sigterm_as_exit, staging
from sbtrain.tasks.base import Fits, Task, TrainingData


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
    """The shared part of every classifier task; subclasses say how their folder is written."""

    schema = Schema(model=EncoderConfig, data=DataConfig)
    causal = False
    unit = "examples"
    counts_correct = True
    streams: ClassVar[int] = 1

    def write(self, folder: Path, workers: int) -> dict:
        """Write the task's splits into `folder` (a fresh, empty one)."""
        raise NotImplementedError

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        if any(inputs.values()):
            raise UserError(
                f"--trainpref/--validpref/--testpref are for language models; the {self.name} "
                "task reads data.raw (or generates its data)"
            )
        data = self.recipe.data
        target = Path(os.path.abspath(data.dir))
        check_target(target, {"raw": Path(os.path.abspath(data.raw))} if data.raw else {}, force)
        with sigterm_as_exit(), staging(target, force) as folder:
            stats = self.write(folder, data.workers)
        for split, s in stats.items():
            log(
                f"| [{split}] {s.examples} examples, {s.tokens} tokens, lengths "
                f"{s.min_length}..{s.max_length} (mean {s.mean_length}), classes {s.label_counts}"
            )
        log(f"| wrote {data.dir}")
        return stats

    # -- data and model -------------------------------------------------------------------------

    def open(self, split: str, folder: str | None = None):
        """A split of `folder` (default data.dir), checked to be this task's and to fit
        data.tokens_per_sample."""
        folder = folder or self.recipe.data.dir
        opened = open_split(folder, split)
        if opened.meta["task"] != self.name:
            raise UserError(
                f"{folder} holds {opened.meta['task']} data, the recipe is {self.name}: point "
                f"data.dir at a {self.name} folder"
            )
        self._pad_id = int(opened.meta["pad_id"])
        longest = max(int(opened.lengths(s).max(initial=0)) for s in range(self.streams))
        limit = self.recipe.data.tokens_per_sample
        if longest > limit:
            raise UserError(
                f"data.tokens_per_sample={limit} is shorter than the longest document of "
                f"{opened.name} ({longest} tokens in {folder}); raise it to {longest}"
            )
        return opened

    def model_args(self, meta: dict) -> dict:
        return {key: int(meta[key]) for key in ("vocab_size", "num_classes", "pad_id", "cls_id")}

    def training_data(self) -> TrainingData:
        train = self.open("train")
        names = train.meta["splits"]
        valid_name = "valid" if "valid" in names else ("test" if "test" in names else None)
        valid = None
        if valid_name is not None:
            valid = Documents(self.open(valid_name), self.streams)
        docs = Documents(train, self.streams)
        return TrainingData(len(docs), valid, lambda epoch: docs, self.model_args(train.meta))

    def build_model(self, vocab_size, num_classes, pad_id, cls_id) -> nn.Module:
        cls = DualEncoderClassifier if self.streams == 2 else Classifier
        length = self.recipe.data.tokens_per_sample
        return cls(self.recipe.model, vocab_size, num_classes, length, pad_id, cls_id)

    def collate(self, samples: list) -> tuple[torch.Tensor, ...]:
        """(tokens, lengths) per document stream, padded to the batch's longest; then labels."""
        out = []
        for s in range(self.streams):
            out += pad([sample[s] for sample in samples], self.pad_id)
        return (*out, torch.tensor([sample[-1] for sample in samples], dtype=torch.long))

    @property
    def pad_id(self) -> int:
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

    def eval_set(
        self, split: str, folder: str | None, context_window: int, length: int, fits: Fits
    ):
        docs = self.open(split, folder)
        fits(folder or self.recipe.data.dir, docs.meta)
        return Documents(docs, self.streams), None


class ListOps(Classification):
    name = "listops"
    schema = Schema(model=EncoderConfig, data=DataConfig, settings=listops.ListOpsConfig)

    def write(self, folder: Path, workers: int) -> dict:
        try:
            return listops.prepare(folder, self.recipe.settings, workers)
        except ValueError as e:
            raise UserError(f"listops: {e}") from None


class Pathfinder(Classification):
    name = "pathfinder"
    schema = Schema(model=EncoderConfig, data=DataConfig, settings=pathfinder.PathfinderConfig)

    def write(self, folder: Path, workers: int) -> dict:
        return pathfinder.prepare(folder, self.recipe.settings, workers)


class Downloaded(Classification):
    """Tasks read from files users download (data.raw)."""

    reader: ClassVar[str]

    def write(self, folder: Path, workers: int) -> dict:
        raw = self.recipe.data.raw
        if raw is None:
            raise UserError(
                f"data.raw: set it to the downloaded {self.name} data (see data/README.md)"
            )
        return getattr(readers, self.reader)(folder, raw)


class Text(Downloaded):
    name, reader = "text", "prepare_text"


class Image(Downloaded):
    name, reader = "image", "prepare_image"


class Retrieval(Downloaded):
    name, reader, streams = "retrieval", "prepare_retrieval", 2
