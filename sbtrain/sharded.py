"""Sharded checkpoints (`train.parallel: fsdp`): each process writes its shards of the model and
optimizer with torch.distributed.checkpoint, so a checkpoint never passes through one process's
memory, and a run saved with P processes loads with any number (the shards are re-cut on load).

A checkpoint is a folder `.sharded-<updates>-<token>/` of `save_dir` holding the shards, DCP's
`.metadata` and `state.pt` (everything else a run resumes from: plain data, torch.save'd). The
names users see, `checkpoint_last.pt`, `checkpoint_best.pt` and the numbered ones, are symbolic
links to such folders, each replaced atomically once its folder is complete: a crash mid-save
leaves them pointing at the last complete checkpoint, and a folder no name points to is removed
by the next save. `eval-ppl`, `generate`, `export` and `--restore-file` read them directly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from sbtrain.errors import UserError
from sbtrain.staging import disk_error, torch_save

STATE_FILE = "state.pt"
PREFIX = ".sharded-"
TEMP = ".tmp-"


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir()


def save(state: dict, model, optimizer, save_dir: Path, names: list[str], main: bool) -> None:
    """Write a checkpoint of `model` and `optimizer` (this process's shards) and `state` (plain
    data, from the main process) into a new folder, then point `names` at it. Every process calls
    this; a failed write becomes one UserError naming the folder."""
    token = [uuid.uuid4().hex[:8]]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)  # one folder for every process
    updates = state["counters"]["updates"]
    folder = save_dir / f"{PREFIX}{updates:09d}-{token[0]}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    error = None
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    except (OSError, CheckpointException) as e:  # DCP reports any process's failed write
        error = system_error(e)
    if not any_failed(error) and main:
        try:  # DCP unpickles .metadata: only ever one whose digest we wrote beside it
            with open(folder / STATE_FILE, "wb") as f:
                torch_save({**state, "metadata_sha256": digest(folder)}, f)
            for name in names:
                link = save_dir / f"{TEMP}{name}.{os.getpid()}"
                link.unlink(missing_ok=True)
                link.symlink_to(folder.name, target_is_directory=True)
                os.replace(link, save_dir / name)
            remove_unnamed(save_dir)
        except OSError as e:
            error = e
    if any_failed(error):  # every process stops here, with the same advice
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        advice = ("free space on its disk and rerun the same command: it resumes from the last "
                  "checkpoint saved, which is intact")  # fmt: skip
        if isinstance(error, OSError):
            raise disk_error(error, folder, advice) from None
        why = "another process could not write its part" if error is None else str(error)[:200]
        raise UserError(f"{folder}: the checkpoint could not be written ({why}); {advice}")


def system_error(error: BaseException) -> BaseException:
    """The OSError behind a failed DCP write (DCP wraps each process's in a CheckpointException),
    or the error itself."""
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return error


def any_failed(error: BaseException | None) -> bool:
    """Whether any process holds an error (a collective: every process calls it)."""
    if not dist.is_initialized():
        return error is not None
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, error is not None)
    return any(flags)


def remove_unnamed(save_dir: Path) -> None:
    """Delete checkpoint folders no name points to (a crashed save's, or superseded ones)."""
    named = {p.resolve() for p in save_dir.iterdir() if p.is_symlink()}
    for folder in save_dir.glob(f"{PREFIX}*"):
        if folder.resolve() not in named:
            shutil.rmtree(folder, ignore_errors=True)


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / ".metadata").read_bytes()).hexdigest()


def read_state(path: Path) -> dict:
    """The plain state of a sharded checkpoint (read without unpickling anything but plain
    data), once its DCP `.metadata` (which DCP unpickles) is known to be the one sbtrain wrote:
    a UserError for a torn or foreign folder."""
    state_file = path / STATE_FILE
    if not (path / ".metadata").is_file() or not state_file.is_file():
        raise UserError(
            f"{path}: not a complete sharded checkpoint (no .metadata or {STATE_FILE}: a save "
            "cut short, or another tool's folder); use another checkpoint"
        )
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: torch raises many types
        raise UserError(
            f"{state_file}: not readable ({type(e).__name__}); use another checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("metadata_sha256") != digest(path):
        raise UserError(
            f"{path}: its .metadata is not the one sbtrain wrote with {STATE_FILE} (it is not "
            "read: DCP would unpickle it); use another checkpoint"
        )
    return state


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every model tensor a sharded checkpoint holds."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {
        key.removeprefix("model."): tuple(item.size)
        for key, item in metadata.items()
        if key.startswith("model.") and hasattr(item, "size")
    }


def load(path: Path, model, optimizer=None, keep=lambda name: True) -> None:
    """Fill `model` (sharded or not) and `optimizer` from checkpoint folder `path`, re-cutting
    shards for this process count; only the model tensors `keep(name)` accepts are read."""
    model_state, optimizer_state = get_state_dict(model, optimizer or [])
    model_state = {name: t for name, t in model_state.items() if keep(name)}
    wanted = {"model": model_state}
    if optimizer is not None:
        wanted["optimizer"] = optimizer_state
    try:
        dcp.load(wanted, checkpoint_id=path)
    except (Exception, CheckpointException):  # DCP's report holds remote tracebacks
        raise UserError(
            f"{path}: its shards cannot be read (one is missing, cut short or not from this "
            "checkpoint); use another checkpoint"
        ) from None
    options = StateDictOptions(strict=False)
    set_state_dict(
        model, optimizer or [], model_state_dict=model_state,
        optim_state_dict=optimizer_state if optimizer is not None else {}, options=options,
    )  # fmt: skip


def load_whole(state: dict, model, optimizer=None) -> None:
    """Fill a sharded `model` (and `optimizer`) from a single-file checkpoint's `state`: its whole
    tensors, each process keeping its shards. The optimizer's state, saved keyed by parameter
    position, is keyed by parameter name first, as DCP reads it."""
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=whole)
    if optimizer is None:
        return
    saved = state["optimizer"]
    names = {id(p): name for name, p in model.named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    positions = [i for group in saved["param_groups"] for i in group["params"]]
    name_of = dict(zip(positions, current))
    by_name = {
        "state": {name_of[i]: values for i, values in saved["state"].items()},
        "param_groups": [
            {**group, "params": [name_of[i] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)
