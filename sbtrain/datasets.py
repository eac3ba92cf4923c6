"""Samples for training and evaluation: LM blocks read from a memmap, and the Copy task.

Every dataset yields `(inputs, targets)`: two int64 tensors of the same length; a target of
`IGNORE` (-100) is not scored. `EpochSampler` decides which samples make each update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sbtrain.batch import IGNORE
from sbtrain.config import Section, opt
from sbtrain.errors import UserError
from sbtrain.tokenizer import read_meta

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
COPY_SEEDS = {"valid": 10_007, "test": 20_011}  # fixed evaluation sets, the same for every run


class LMBlocks(torch.utils.data.Dataset):
    """A token stream cut into blocks of `length` targets, each with its preceding context.

    The stream is the split's tokens with one end-of-line token in front, so every token of the
    split is a target exactly once (the first one conditioned on "a line just ended", as fairseq
    does). Block b scores targets [b*length, (b+1)*length) of the split; with `context` > 0 its
    input also holds up to `context` earlier tokens, which are not scored (fairseq's
    --context-window). `drop_last` drops a final short block (training); evaluation keeps it.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        eol_id: int,
        length: int,
        context: int = 0,
        drop_last: bool = True,
    ):
        self.tokens, self.eol_id, self.length, self.context = tokens, eol_id, length, context
        n = len(tokens)
        self.n_blocks = n // length if drop_last else -(-n // length)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = b * self.length  # first target of the block, as an index into the split
        stop = min(start + self.length, len(self.tokens))
        first = max(start - self.context, 0)  # first target-or-context token
        window = np.asarray(self.tokens[max(first - 1, 0) : stop], dtype=np.int64)
        if first == 0:  # the virtual end-of-line before the split
            window = np.concatenate([[self.eol_id], window])
        window = torch.from_numpy(window)
        inputs, targets = window[:-1], window[1:].clone()
        targets[: start - first] = IGNORE  # context tokens are seen, not scored
        return inputs, targets


def open_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, dict]:
    """The memmapped token ids of a preprocessed split, and meta.json."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} not found: split {split!r} was not preprocessed into {data_dir}")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise UserError(f"{Path(data_dir) / 'meta.json'}: unknown dtype {meta.get('dtype')!r}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty: split {split!r} holds no tokens")
    redo = f"run `sbtrain preprocess --force` on its recipe to write {data_dir} again"
    if size % np.dtype(dtype).itemsize:
        raise UserError(f"{path} is cut short ({size} bytes is no whole number of {meta['dtype']} "
                        f"ids); {redo}")  # fmt: skip
    stats = Path(data_dir) / f"{split}.json"
    if stats.is_file():
        try:
            expected = int(json.loads(stats.read_text(encoding="utf-8"))["tokens"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{stats} is not a preprocess record; {redo}") from None
        found = size // np.dtype(dtype).itemsize
        if found != expected:
            raise UserError(f"{path} holds {found} tokens, {stats} says {expected}; {redo}")
    return np.memmap(path, dtype=dtype, mode="r"), meta


class CopyTask(torch.utils.data.Dataset):
    """Sequences `0 w 0 w`, w uniform over symbols 1..n_symbols; only the second w is scored.

    Sample i of epoch e is drawn from the seed (seed, e, i): any sample can be regenerated, so
    training sets can be fresh each epoch and evaluation sets fixed.
    """

    def __init__(self, n_symbols: int, length: int, size: int, seed: int, epoch: int = 0):
        self.n_symbols, self.length, self.size, self.seed, self.epoch = (
            n_symbols, length, size, seed, epoch
        )  # fmt: skip

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        w = rng.integers(1, self.n_symbols + 1, size=self.length)
        seq = torch.from_numpy(np.concatenate([[0], w, [0], w]).astype(np.int64))
        inputs, targets = seq[:-1], seq[1:].clone()
        targets[: self.length + 1] = IGNORE  # score the second copy only
        return inputs, targets


@dataclass(frozen=True)
class CopySettings(Section):
    """The copy task's samples (a recipe's `copy:`)."""

    n_symbols: int = opt(127, "symbols 1..N", "positive")
    length: int = opt(511, "|w|; a sample is `0 w 0 w`, 2|w|+2 tokens", "positive")
    train_size: int = opt(100_000, "training samples per epoch (fresh each epoch)", "positive")
    valid_size: int = opt(512, "validation samples (fixed)", "positive")
    test_size: int = opt(1024, "test samples (fixed)", "positive")


def copy_split(settings: CopySettings, split: str) -> CopyTask:
    """A fixed copy-task evaluation set: `valid` or `test` (seeds independent of the recipe)."""
    if split not in COPY_SEEDS:
        raise UserError(f"split {split!r}: the copy task has the splits valid and test")
    c = settings
    size = c.valid_size if split == "valid" else c.test_size
    return CopyTask(c.n_symbols, c.length, size, COPY_SEEDS[split])


class EpochSampler:
    """Which samples make each update: a seeded permutation per epoch, cut into global batches.

    Each global batch of `batch_size` samples is the same whatever the number of processes;
    rank r takes its contiguous share of it. The position (epoch, batches done) is saved in
    checkpoints, so a restored sampler continues with exactly the batches an uninterrupted one
    would yield.
    """

    def __init__(
        self, n_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if batch_size % world_size:
            raise UserError(
                f"train.batch_size={batch_size} cannot be split over {world_size} processes; "
                "make it a multiple of the number of processes"
            )
        if n_samples < batch_size:
            raise UserError(
                f"the training set has {n_samples} samples, "
                f"fewer than train.batch_size={batch_size}"
            )
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batches_done = 1, 0

    def __len__(self) -> int:
        """Updates per epoch (a last partial batch is dropped)."""
        return self.n_samples // self.batch_size

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_samples, generator=g)

    def epoch_batches(self):
        """Yields this rank's sample indices of each remaining global batch of the epoch."""
        order = self._order()
        share = self.batch_size // self.world_size
        while self.batches_done < len(self):
            start = self.batches_done * self.batch_size + self.rank * share
            self.batches_done += 1
            yield order[start : start + share].tolist()

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
