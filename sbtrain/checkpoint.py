"""Checkpoints: written atomically, read without unpickling anything but tensors and plain data.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (so
`torch.load(weights_only=True)` reads it): model, optimizer, scaler, rng, sampler, counters,
the resolved recipe and versions, with `format` marking it as ours.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from sbtrain.errors import UserError

FORMAT = "sbtrain-checkpoint-1"
TEMP_PREFIX = ".tmp-"  # in-progress writes: `.tmp-<name>.<pid>`; removed before every save
NUMBERED = re.compile(r"checkpoint_(\d+)_(\d+)\.pt$")


def save(state: dict, path: Path, also: list[Path] = ()) -> None:
    """Write `state` to `path` (temp file, fsync, rename), then give it the names in `also`.

    A reader sees either the old file or the complete new one, whenever the process dies.
    """
    path = Path(path)
    remove_temps(path.parent)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for other in also:  # a hard link of the finished file, renamed into place: also atomic
        link = other.parent / f"{TEMP_PREFIX}{other.name}.{os.getpid()}"
        os.link(path, link)
        os.replace(link, other)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temps(folder: Path) -> None:
    """Delete temp files left by a process killed while writing."""
    for stale in Path(folder).glob(f"{TEMP_PREFIX}*"):
        stale.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Read a checkpoint to CPU; a UserError for anything that is not a whole sbtrain checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; name the two cases users meet
        if isinstance(e, pickle.UnpicklingError) and "global" in str(e).lower():
            raise UserError(
                f"{path}: refused: it holds Python objects that safe loading does not allow "
                "(they could run code; sbtrain checkpoints never do); nothing was executed"
            ) from None
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {type(e).__name__}); "
            "use another checkpoint, e.g. checkpoint_best.pt or a numbered one"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an sbtrain checkpoint (no {FORMAT!r} marker)")
    return state


def numbered(folder: Path) -> list[Path]:
    """checkpoint_{epoch}_{updates}.pt files, oldest first."""
    found = [
        (int(m[2]), p)
        for p in Path(folder).glob("checkpoint_*_*.pt")
        if (m := NUMBERED.search(p.name))
    ]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` numbered checkpoints (0: keep all)."""
    if keep_last > 0:
        for old in numbered(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
