"""Classification splits on disk (format "sbtrain-cls-1"): write them, stream by stream, and
open them again as memory maps.

    stats = write_split(folder, "train", batches, dtype="uint8")   # batches: Iterable[Examples]
    write_meta(folder, meta)
    split = open_split(folder, "train")                            # checked memmaps
    tokens, label = split[i]; tokens_a, tokens_b = split.pair(i)   # one example

Folder layout (see data/README.md, "Long Range Arena"):
    {split}.bin      tokens of every example, concatenated, no header (meta["dtype"])
    {split}.idx      int64 offsets into .bin: N+1 of them, 0 first, the token count last
    {split}.1.bin    second documents of pair tasks (retrieval), with {split}.1.idx
    {split}.labels   int64 class of each example
    {split}.json     {"examples", "tokens", "min_length", "mean_length", "max_length",
                      "label_counts"}
    meta.json        {"format", "version", "task", "token_kind", "symbols", "vocab_size",
                      "pad_id", "cls_id", "dtype", "num_classes", "streams", "shape",
                      "splits", "source"}
All arrays are little-endian. Padding and CLS ids are never stored: they belong to the model's
input (ids `pad_id`, `cls_id` after the stored tokens' ids, inside `vocab_size`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sbtrain.errors import UserError
from sbtrain.staging import write_json

FORMAT = "sbtrain-cls-1"
VERSION = 1
LE_INT64 = np.dtype("<i8")


class LraDataError(UserError, ValueError):
    """A file that is missing, malformed or not in the layout expected: one line naming the
    path, what was expected and what to do."""


@dataclass
class Examples:
    """A batch of examples: a 1-D token array per example (and per second document for pair
    tasks) and their integer classes."""

    tokens: list[np.ndarray]
    labels: list[int]
    pairs: list[np.ndarray] | None = None  # second documents, pair tasks only


@dataclass(frozen=True)
class SplitStats:
    """Counts of one written split (lengths over every document, both of a pair)."""

    examples: int = 0
    tokens: int = 0
    min_length: int = 0
    mean_length: float = 0.0
    max_length: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)  # class (as text) -> examples

    def to_json(self) -> dict:
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "min_length": self.min_length,
            "mean_length": self.mean_length,
            "max_length": self.max_length,
            "label_counts": self.label_counts,
        }


def token_dtype(stored_ids: int) -> str:
    """The narrowest unsigned dtype for stored ids below `stored_ids`."""
    return "uint8" if stored_ids <= 256 else "uint16"


def stream_name(split: str, stream: int) -> str:
    return split if stream == 0 else f"{split}.{stream}"


def write_split(
    folder: str | Path, split: str, batches: Iterable[Examples], dtype: str
) -> SplitStats:
    """Stream `batches` into `{split}.bin/.idx` (and `.1.bin/.1.idx` for pairs),
    `{split}.labels` and `{split}.json`; returns the stats written to the latter.

    Memory holds one batch plus the offsets and labels (8 bytes each per example)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    limit = np.iinfo(np_dtype).max
    streams = None
    offsets: list[list[int]] = []
    labels: list[int] = []
    lengths: list[np.ndarray] = []
    outs = []
    with ExitStack() as files:
        for batch in batches:
            docs = [batch.tokens] if batch.pairs is None else [batch.tokens, batch.pairs]
            if streams is None:
                streams = len(docs)
                offsets = [[0] for _ in docs]
                outs = [
                    files.enter_context(open(folder / f"{stream_name(split, s)}.bin", "wb"))
                    for s in range(streams)
                ]
            if len(docs) != streams or any(len(d) != len(batch.labels) for d in docs):
                raise ValueError("every batch needs the same streams and one label per example")
            for s, stream in enumerate(docs):
                for tokens in stream:
                    tokens = np.asarray(tokens)
                    if tokens.size and (tokens.min() < 0 or tokens.max() > limit):
                        raise ValueError(f"token ids outside {dtype} in split {split}")
                    outs[s].write(tokens.astype(np_dtype, copy=False).tobytes())
                    offsets[s].append(offsets[s][-1] + tokens.size)
                lengths.append(np.fromiter(map(len, stream), np.int64, len(stream)))
            labels.extend(batch.labels)
    if streams is None:
        raise ValueError(f"split {split} has no examples")
    for s in range(streams):
        np.asarray(offsets[s], LE_INT64).tofile(folder / f"{stream_name(split, s)}.idx")
    label_array = np.asarray(labels, LE_INT64)
    label_array.tofile(folder / f"{split}.labels")
    all_lengths = np.concatenate(lengths)
    classes, counts = np.unique(label_array, return_counts=True)
    stats = SplitStats(
        examples=len(labels),
        tokens=int(all_lengths.sum()),
        min_length=int(all_lengths.min()),
        mean_length=round(float(all_lengths.mean()), 2),
        max_length=int(all_lengths.max()),
        label_counts={str(c): int(n) for c, n in zip(classes.tolist(), counts.tolist())},
    )
    write_json(folder / f"{split}.json", stats.to_json())
    return stats


def make_meta(
    task: str,
    token_kind: str,
    stored_ids: int,
    num_classes: int,
    splits: list[str],
    streams: int = 1,
    symbols: list[str] | None = None,
    shape: list[int] | None = None,
    source: dict | None = None,
) -> dict:
    """meta.json of a task: stored ids are 0..stored_ids-1, then pad_id, then cls_id.

    token_kind: "symbols" (ids index `symbols`), "bytes" (UTF-8 bytes) or "pixels" (0-255
    grey levels, row-major over `shape`). `source`: the generator's settings or the raw folder."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "token_kind": token_kind,
        "symbols": symbols,
        "vocab_size": stored_ids + 2,
        "pad_id": stored_ids,
        "cls_id": stored_ids + 1,
        "dtype": token_dtype(stored_ids),
        "num_classes": num_classes,
        "streams": streams,
        "shape": shape,
        "splits": splits,
        "source": source or {},
    }


def write_meta(folder: str | Path, meta: dict) -> None:
    write_json(Path(folder) / "meta.json", meta)


# ---------------------------------------------------------------------------------------------
# reading


class Split:
    """One split opened as read-only memory maps; `split[i]` -> (tokens, label)."""

    def __init__(self, folder: Path, split: str, meta: dict):
        self.meta = meta
        self.name = split
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.labels = _memmap(folder / f"{split}.labels", LE_INT64)
        self.tokens, self.offsets = [], []
        for s in range(meta["streams"]):
            name = stream_name(split, s)
            tokens = _memmap(folder / f"{name}.bin", dtype)
            offsets = _memmap(folder / f"{name}.idx", LE_INT64)
            _check_offsets(folder / f"{name}.idx", offsets, len(tokens), len(self.labels))
            self.tokens.append(tokens)
            self.offsets.append(offsets)
        bad = (self.labels < 0) | (self.labels >= meta["num_classes"])
        if bad.any():
            raise LraDataError(
                f"{folder / f'{split}.labels'}: class {int(self.labels[bad.argmax()])} outside "
                f"0..{meta['num_classes'] - 1}; the folder is corrupt, run the preprocessing again"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def document(self, i: int, stream: int = 0) -> np.ndarray:
        """Tokens of example `i` (of its second document for stream 1), a memmap view."""
        offsets = self.offsets[stream]
        return self.tokens[stream][offsets[i] : offsets[i + 1]]

    def lengths(self, stream: int = 0) -> np.ndarray:
        return np.diff(self.offsets[stream])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.document(i), int(self.labels[i])

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self.document(i, 0), self.document(i, 1), int(self.labels[i])


def read_meta(folder: str | Path) -> dict:
    """meta.json of a classification folder, checked; LraDataError when it is not one."""
    path = Path(folder) / "meta.json"
    what = f"a folder written by the LRA preprocessing (format {FORMAT})"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LraDataError(f"{path}: not found; expected {what}") from None
    except (OSError, ValueError) as e:
        raise LraDataError(f"{path}: unreadable ({e}); run the preprocessing again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise LraDataError(f"{path}: format {found!r}, expected {what}")
    if meta.get("version") != VERSION:
        raise LraDataError(
            f"{path}: version {meta.get('version')!r} of {FORMAT}, this sbtrain reads version "
            f"{VERSION}; run the preprocessing again with this version"
        )
    return meta


def open_split(folder: str | Path, split: str) -> Split:
    """Open `split` of a classification folder; lengths and offsets are checked, and any
    corrupt or foreign file raises LraDataError naming it."""
    folder = Path(folder)
    meta = read_meta(folder)
    if split not in meta["splits"]:
        raise LraDataError(
            f"{folder}: no split {split!r} (it has {', '.join(meta['splits'])}); pick one of those"
        )
    return Split(folder, split, meta)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LraDataError(f"{path}: missing; run the preprocessing again") from None
    if size % dtype.itemsize:
        raise LraDataError(
            f"{path}: {size} bytes is not a whole number of {dtype.name} values; the file is "
            "truncated or foreign, run the preprocessing again"
        )
    if size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_offsets(path: Path, offsets: np.ndarray, tokens: int, examples: int) -> None:
    problem = None
    if len(offsets) != examples + 1:
        problem = f"{len(offsets)} offsets for {examples} labels (expected {examples + 1})"
    elif offsets[0] != 0 or offsets[-1] != tokens:
        problem = f"offsets run {offsets[0]}..{offsets[-1]}, the tokens file holds {tokens}"
    elif (np.diff(offsets) < 0).any():
        problem = "offsets decrease"
    if problem:
        raise LraDataError(f"{path}: {problem}; the folder is corrupt, run the preprocessing again")
