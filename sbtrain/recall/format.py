"""Scored sequences: the JSONL format users and generators write, and its binarized folder.

JSONL (one sequence a line, any tool can write it):

    {"input": [3, 17, 5, 9], "target": [null, null, 42, null]}

`input` and `target` have the same length; `target[i]` is what the model should predict at
position i (having read input[0..i]), `null` where nothing is scored; every line scores at least
one position. A folder holds `train.jsonl`, `valid.jsonl`, `test.jsonl` (valid and test optional).

Binarized folder (format "sbtrain-seq-1"), written by `binarize` through a staging folder:
    {split}.inputs.bin, {split}.targets.bin   ids, little-endian `dtype`, sequences back to back;
                                              a target of NULL[dtype] is not scored
    {split}.offsets.bin                       int64, sequence i is [offsets[i], offsets[i+1])
    {split}.json   {"sequences", "tokens", "scored", "min_length", "max_length"}
    meta.json      {"format", "vocab_size", "dtype", "splits", "source"}
Reading and writing stream a line (or a block of lines) at a time: memory stays bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sbtrain.batch import IGNORE
from sbtrain.config import DataConfig, opt
from sbtrain.errors import UserError
from sbtrain.staging import write_json

FORMAT = "sbtrain-seq-1"
SPLITS = ("train", "valid", "test")
NULL = {"uint16": 2**16 - 1, "uint32": 2**32 - 1}  # the target value of an unscored position
BLOCK = 4096  # sequences buffered before a write


@dataclass
class SplitStats:
    sequences: int = 0
    tokens: int = 0
    scored: int = 0
    min_length: int = 0
    max_length: int = 0

    def add(self, length: int, scored: int) -> None:
        self.min_length = length if not self.sequences else min(self.min_length, length)
        self.max_length = max(self.max_length, length)
        self.sequences += 1
        self.tokens += length
        self.scored += scored


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype holding ids below `vocab_size` and the NULL marker above them."""
    if vocab_size < NULL["uint16"]:
        return "uint16"
    if vocab_size < NULL["uint32"]:
        return "uint32"
    raise UserError(f"a vocabulary of {vocab_size} ids does not fit uint32; use a smaller one")


def read_lines(path: Path, vocab_size: int | None, max_length: int) -> Iterator[tuple[list, list]]:
    """(input, target) of every line of a JSONL split, each checked; a UserError naming
    path:line for the first line that is not a scored sequence this recipe can take (ids below
    `vocab_size` when given, at most `max_length` positions)."""
    number = read = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    read += 1
                    yield check_line(line, f"{path}:{number}", vocab_size, max_length)
    except UnicodeDecodeError:
        raise UserError(f"{path}:{number + 1}: not UTF-8 text; write it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if read == 0:
        raise UserError(f"{path}: the split is empty; write at least one sequence")


def check_line(line: str, where: str, vocab_size: int | None, max_length: int) -> tuple:
    """One JSONL line as (input ids, target ids or None), or a UserError naming `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); one object per line") from None
    if not isinstance(record, dict) or not {"input", "target"} <= set(record):
        raise UserError(f'{where}: expected {{"input": [ids], "target": [ids or null]}}')
    inputs, targets = record["input"], record["target"]
    if not isinstance(inputs, list) or not isinstance(targets, list):
        raise UserError(f"{where}: input and target must be lists")
    if len(inputs) != len(targets):
        raise UserError(
            f"{where}: input has {len(inputs)} ids, target {len(targets)}; they must be as long"
        )
    if not inputs:
        raise UserError(f"{where}: an empty sequence")
    if len(inputs) > max_length:
        raise UserError(
            f"{where}: {len(inputs)} positions, longer than data.tokens_per_sample={max_length}; "
            "raise it or shorten the line"
        )
    for name, ids in (("input", inputs), ("target", targets)):
        for i in ids:
            if name == "target" and i is None:
                continue
            if not isinstance(i, int) or isinstance(i, bool):
                raise UserError(f"{where}: {name} holds {i!r}; ids are integers (null in target)")
            if i < 0 or (vocab_size is not None and i >= vocab_size):
                top = f"{vocab_size - 1}" if vocab_size is not None else "..."
                raise UserError(f"{where}: {name} id {i} is outside 0..{top} (data.vocab_size)")
    if all(t is None for t in targets):
        raise UserError(f"{where}: no position is scored; give at least one non-null target")
    return inputs, targets


def scan(paths: dict[str, Path], max_length: int) -> int:
    """Check every line of every split (no vocabulary bound); returns the largest id + 1."""
    top = 0
    for path in paths.values():
        for inputs, targets in read_lines(path, None, max_length):
            top = max(top, max(inputs), max(t for t in targets if t is not None))
    return top + 1


def binarize_split(path: Path, out: Path, split: str, vocab_size: int, max_length: int) -> dict:
    """Stream the JSONL `path` into `out`'s `{split}.*.bin` files; returns its stats."""
    dtype = token_dtype(vocab_size)
    null, stats, offsets = NULL[dtype], SplitStats(), [0]
    inputs_block, targets_block = [], []
    with (
        open(out / f"{split}.inputs.bin", "wb") as f_in,
        open(out / f"{split}.targets.bin", "wb") as f_target,
        open(out / f"{split}.offsets.bin", "wb") as f_offsets,
    ):
        np.zeros(1, dtype="<i8").tofile(f_offsets)
        for inputs, targets in read_lines(path, vocab_size, max_length):
            stats.add(len(inputs), sum(t is not None for t in targets))
            inputs_block.append(np.asarray(inputs, dtype=np.int64))
            targets_block.append(np.asarray([null if t is None else t for t in targets], np.int64))
            offsets.append(offsets[-1] + len(inputs))
            if len(inputs_block) == BLOCK:
                _write(f_in, f_target, f_offsets, inputs_block, targets_block, offsets, dtype)
                inputs_block, targets_block, offsets = [], [], [offsets[-1]]
        _write(f_in, f_target, f_offsets, inputs_block, targets_block, offsets, dtype)
    write_json(out / f"{split}.json", asdict(stats))
    return asdict(stats)


def _write(f_in, f_target, f_offsets, inputs, targets, offsets, dtype: str) -> None:
    if not inputs:
        return
    little = np.dtype(dtype).newbyteorder("<")
    np.concatenate(inputs).astype(little).tofile(f_in)
    np.concatenate(targets).astype(little).tofile(f_target)
    np.asarray(offsets[1:], dtype="<i8").tofile(f_offsets)


def binarize(raw: Path, out: Path, vocab_size: int | None, max_length: int, source: dict) -> dict:
    """Every split of the JSONL folder `raw` into the binarized folder `out` (a fresh one);
    `vocab_size` None: the largest id in the data + 1. Returns the stats per split."""
    paths = {s: raw / f"{s}.jsonl" for s in SPLITS if (raw / f"{s}.jsonl").is_file()}
    if "train" not in paths:
        raise UserError(f"{raw}: no train.jsonl; a folder of train.jsonl (valid, test) is needed")
    if vocab_size is None:
        vocab_size = scan(paths, max_length)
    stats = {s: binarize_split(p, out, s, vocab_size, max_length) for s, p in paths.items()}
    meta = {"format": FORMAT, "vocab_size": vocab_size, "dtype": token_dtype(vocab_size),
            "splits": list(paths), "source": source}  # fmt: skip
    write_json(out / "meta.json", meta)
    return stats


# ---------------------------------------------------------------------------------------------
# reading a binarized folder


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{path} not found: run `sbtrain preprocess` on the recipe first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; run `sbtrain preprocess --force`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder}: not a scored-sequence folder ({FORMAT}); preprocess it")
    splits, dtype, vocab = meta.get("splits"), meta.get("dtype"), meta.get("vocab_size")
    if not (isinstance(splits, list | dict) and dtype in NULL and isinstance(vocab, int)):
        raise UserError(f"{path}: damaged (splits, dtype or vocab_size); run `sbtrain preprocess "
                        "--force`")  # fmt: skip
    return meta


class Sequences(torch.utils.data.Dataset):
    """A binarized split: item i is (inputs, targets) int64, targets IGNORE where not scored."""

    def __init__(self, folder: str | Path, split: str):
        self.meta = meta = read_meta(folder)
        if split not in meta["splits"]:
            raise UserError(f"{folder} has no {split} split (it has {', '.join(meta['splits'])})")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.null = NULL[meta["dtype"]]
        self.offsets = _memmap(Path(folder) / f"{split}.offsets.bin", np.dtype("<i8"))
        self.inputs = _memmap(Path(folder) / f"{split}.inputs.bin", dtype)
        self.targets = _memmap(Path(folder) / f"{split}.targets.bin", dtype)
        tokens = int(self.offsets[-1]) if len(self.offsets) else -1
        if len(self.offsets) < 2 or not tokens == len(self.inputs) == len(self.targets):
            raise UserError(
                f"{folder}: the {split} files disagree; run `sbtrain preprocess --force`"
            )
        self.name = split

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        inputs = torch.from_numpy(self.inputs[start:stop].astype(np.int64))
        targets = self.targets[start:stop].astype(np.int64)
        targets[targets == self.null] = IGNORE
        return inputs, torch.from_numpy(targets)

    def longest(self) -> int:
        return int(np.diff(self.offsets).max(initial=0))


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} not found: run `sbtrain preprocess --force` on the recipe")
    if path.stat().st_size % dtype.itemsize:
        raise UserError(f"{path} is cut short; run `sbtrain preprocess --force` on the recipe")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass(frozen=True)
class SequenceData(DataConfig):
    """A folder of JSONL splits (data.raw) and its binarized copy (data.dir)."""

    raw: str | None = opt(
        None, "preprocess input: a folder of train.jsonl, valid.jsonl, test.jsonl"
    )
    vocab_size: int | None = opt(
        None, "ids are 0..vocab_size-1 (null: the largest id in the data + 1)", "positive"
    )
