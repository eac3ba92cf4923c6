"""Readers for the Long Range Arena data users download themselves, in their published layouts,
each writing a classification folder (format "sbtrain-cls-1", see format.py).

    prepare_text(folder, "aclImdb")                  # IMDb reviews: train, test; bytes
    prepare_image(folder, "cifar-10-batches-py")     # CIFAR-10: train, test; 1,024 grey pixels
    prepare_retrieval(folder, "lra_release/tsv_data")  # AAN pairs: train, valid, test; bytes

A folder that is missing, or a file in another layout, raises LraDataError: one line naming the
path and what was expected.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from sbtrain.lra.format import (
    Examples,
    LraDataError,
    SplitStats,
    make_meta,
    write_meta,
    write_split,
)

MAX_BYTES = 4_000  # bytes kept per document (the Long Range Arena's text and retrieval length)
BATCH = 1_000  # examples held in memory at once
CIFAR_SIDE = 32
# ITU-R BT.601 luma weights, in thousandths: grey = round(0.299 R + 0.587 G + 0.114 B)
LUMA = (299, 587, 114)


# ---------------------------------------------------------------------------------------------
# IMDb: aclImdb/{train,test}/{pos,neg}/*.txt


def prepare_text(folder: str | Path, raw: str | Path, max_bytes: int = MAX_BYTES) -> dict:
    """IMDb reviews (`aclImdb/{train,test}/{pos,neg}/*.txt`, `raw` being aclImdb or the folder
    holding it) -> train and test, the first `max_bytes` bytes of each review, pos = 1."""
    root = _find_root(Path(raw), "aclImdb", "train/pos")
    splits = {}
    for split in ("train", "test"):
        files = []
        for label, name in ((0, "neg"), (1, "pos")):
            sub = root / split / name
            found = sorted(sub.glob("*.txt")) if sub.is_dir() else []
            if not found:
                raise LraDataError(
                    f"{sub}: no *.txt reviews; expected the IMDb layout "
                    "aclImdb/{train,test}/{pos,neg}/*.txt (unpack aclImdb_v1.tar.gz)"
                )
            files += [(path, label) for path in found]
        splits[split] = _batched(
            (np.frombuffer(path.read_bytes()[:max_bytes], np.uint8), label) for path, label in files
        )
    return _write(folder, "text", "bytes", 2, splits, {"raw": str(root), "max_bytes": max_bytes})


# ---------------------------------------------------------------------------------------------
# CIFAR-10: cifar-10-batches-py/{data_batch_1..5, test_batch}


def prepare_image(folder: str | Path, raw: str | Path) -> dict:
    """CIFAR-10's python batches (`raw` being cifar-10-batches-py or the folder holding it) ->
    train (data_batch_1..5) and test (test_batch) as 1,024 grey levels, row-major."""
    root = _find_root(Path(raw), "cifar-10-batches-py", "test_batch")
    splits = {
        "train": [root / f"data_batch_{i}" for i in range(1, 6)],
        "test": [root / "test_batch"],
    }
    for paths in splits.values():
        for path in paths:
            if not path.is_file():
                raise LraDataError(
                    f"{path}: missing; expected CIFAR-10's python batches data_batch_1..5 and "
                    "test_batch (unpack cifar-10-python.tar.gz)"
                )
    batches = {split: (_cifar_examples(p) for p in paths) for split, paths in splits.items()}
    return _write(
        folder, "image", "pixels", 10, batches, {"raw": str(root)}, shape=[CIFAR_SIDE, CIFAR_SIDE]
    )


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """One CIFAR-10 python batch: (N, 3072) uint8 RGB planes and N labels 0-9, unpickled by
    ArrayUnpickler (nothing but arrays, lists, strings and numbers is ever built)."""
    path = Path(path)
    expected = "a CIFAR-10 python batch (a dict with b'data' (N, 3072) uint8 and b'labels')"
    try:
        with open(path, "rb") as f:
            batch = ArrayUnpickler(f, path).load()
    except LraDataError:
        raise
    except Exception as e:  # a truncated or foreign file fails in many ways inside pickle
        raise LraDataError(
            f"{path}: unreadable ({type(e).__name__}: {e}); expected {expected}"
        ) from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * CIFAR_SIDE * CIFAR_SIDE
        and isinstance(labels, list)
        and len(labels) == len(data)
        and all(isinstance(v, int) and 0 <= v < 10 for v in labels)
    ):
        raise LraDataError(f"{path}: not {expected}")
    return data, labels


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(N, 3072) RGB planes -> (N, 1024) uint8 grey: BT.601 luma rounded half up."""
    planes = rgb.reshape(len(rgb), 3, -1).astype(np.int32)
    weighted = sum(w * planes[:, c] for c, w in enumerate(LUMA))
    return ((weighted + 500) // 1000).astype(np.uint8)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, bytes and numbers, and refuses every other
    class or function a pickle names, before anything is called."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # files written with numpy 1
        ("numpy._core.multiarray", "_reconstruct"),  # with numpy 2
    }

    def __init__(self, file: io.BufferedReader, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 strings stay bytes, as written
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes in Python 3
            return _latin1_encode
        raise LraDataError(
            f"{self.path}: the pickle asks for {module}.{name}, which a CIFAR-10 batch never "
            "holds; refused without running it (use the files from cifar-10-python.tar.gz)"
        )


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"bytes encoded as {encoding}, expected latin1")
    return text.encode("latin1")


def _cifar_examples(path: Path) -> Examples:
    data, labels = read_cifar_batch(path)
    return Examples(list(to_grey(data)), labels)


# ---------------------------------------------------------------------------------------------
# AAN pairs: new_aan_pairs.{train,eval,test}.tsv


AAN_FILES = {"train": "train", "valid": "eval", "test": "test"}
AAN_COLUMNS = "label, id1, id2, text1, text2"


def prepare_retrieval(folder: str | Path, raw: str | Path, max_bytes: int = MAX_BYTES) -> dict:
    """The AAN document pairs of the LRA release (`raw` holding new_aan_pairs.{train,eval,
    test}.tsv) -> train, valid (eval) and test pairs, `max_bytes` bytes per document."""
    raw = Path(raw)
    paths = {split: raw / f"new_aan_pairs.{name}.tsv" for split, name in AAN_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise LraDataError(
                f"{path}: missing; expected the LRA release's new_aan_pairs.{{train,eval,test}}"
                ".tsv (lra_release/tsv_data in lra_release.gz)"
            )
    splits = {split: _batched_pairs(read_aan(path, max_bytes)) for split, path in paths.items()}
    return _write(
        folder,
        "retrieval",
        "bytes",
        2,
        splits,
        {"raw": str(raw), "max_bytes": max_bytes},
        streams=2,
    )


def read_aan(path: str | Path, max_bytes: int = MAX_BYTES) -> Iterator[tuple]:
    """(text1 bytes, text2 bytes, label) of each line of an AAN pairs file: tab-separated
    label (0 or 1, may be written 0.0/1.0), id1, id2, text1, text2; no header, no quoting."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            where = f"{path}:{number}"
            if len(fields) != 5:
                raise LraDataError(
                    f"{where}: {len(fields)} tab-separated fields, expected 5 ({AAN_COLUMNS})"
                )
            try:
                label = float(fields[0])
            except ValueError:
                label = None
            if label not in (0.0, 1.0):
                raise LraDataError(f"{where}: label {fields[0]!r}, expected 0 or 1 ({AAN_COLUMNS})")
            yield fields[3][:max_bytes], fields[4][:max_bytes], int(label)


def _batched_pairs(rows: Iterator[tuple]) -> Iterator[Examples]:
    batch = Examples([], [], [])
    for text1, text2, label in rows:
        batch.tokens.append(np.frombuffer(text1, np.uint8))
        batch.pairs.append(np.frombuffer(text2, np.uint8))
        batch.labels.append(label)
        if len(batch.labels) == BATCH:
            yield batch
            batch = Examples([], [], [])
    if batch.labels:
        yield batch


# ---------------------------------------------------------------------------------------------
# shared


def _batched(rows: Iterator[tuple[np.ndarray, int]]) -> Iterator[Examples]:
    batch = Examples([], [])
    for tokens, label in rows:
        batch.tokens.append(tokens)
        batch.labels.append(label)
        if len(batch.labels) == BATCH:
            yield batch
            batch = Examples([], [])
    if batch.labels:
        yield batch


def _find_root(raw: Path, name: str, probe: str) -> Path:
    """`raw` itself or `raw/name`, whichever holds `probe`."""
    for root in (raw, raw / name):
        if (root / probe).exists():
            return root
    if not raw.exists():
        raise LraDataError(f"{raw}: not found; point it at the unpacked {name} folder")
    raise LraDataError(f"{raw}: no {probe} here or in {name}/; point it at the unpacked {name}")


def _write(folder, task, kind, classes, splits, source, shape=None, streams=1) -> dict:
    stats: dict[str, SplitStats] = {}
    for split, batches in splits.items():
        stats[split] = write_split(folder, split, batches, "uint8")
    meta = make_meta(
        task, kind, 256, classes, list(stats), streams=streams, shape=shape, source=source
    )
    write_meta(folder, meta)
    return stats
