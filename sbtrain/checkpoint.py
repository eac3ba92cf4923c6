"""Checkpoints: written atomically, read without unpickling anything but tensors and plain data;
where a run resumes from and what it must match; a checkpoint's model, loaded for evaluation.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (so
`torch.load(weights_only=True)` reads it): model, optimizer, scaler, rng, sampler, counters,
the resolved recipe and versions, with `format` marking it as ours.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from sbtrain import sharded
from sbtrain.attention import dispatch
from sbtrain.config import AttentionConfig, Recipe
from sbtrain.distributed import Layout
from sbtrain.errors import UserError
from sbtrain.staging import disk_error, torch_save
from sbtrain.tasks import Task, build_model, get_task, recipe_from_dict

FORMAT = "sbtrain-checkpoint-1"
TEMP_PREFIX = ".tmp-"  # in-progress writes: `.tmp-<name>.<pid>`; removed before every save
NUMBERED = re.compile(r"checkpoint_(\d+)_(\d+)\.pt$")


def save(state: dict, path: Path, also: list[Path] = ()) -> None:
    """Write `state` to `path` (temp file, fsync, rename), then give it the names in `also`.

    A reader sees either the old file or the complete new one, whenever the process dies.
    """
    path = Path(path)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        remove_temps(path.parent)
        with open(tmp, "wb") as f:
            torch_save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for other in also:  # a hard link of the finished file, renamed into place: also atomic
            link = other.parent / f"{TEMP_PREFIX}{other.name}.{os.getpid()}"
            os.link(path, link)
            os.replace(link, other)
        _fsync_dir(path.parent)
    except OSError as error:
        _clean(path.parent)
        advice = ("free space on its disk (or fix the folder) and rerun the same command: it "
                  "resumes from the last checkpoint saved, which is intact")  # fmt: skip
        raise disk_error(error, path, advice) from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a folder gone or unreadable holds nothing of ours
        remove_temps(folder)


def remove_temps(folder: Path) -> None:
    """Delete temp files left by a process killed while writing."""
    for stale in Path(folder).glob(f"{TEMP_PREFIX}*"):
        stale.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Read a checkpoint to CPU; a UserError for anything that is not a whole sbtrain checkpoint."""
    path = Path(path)
    if sharded.is_sharded(path):  # a folder of shards (train.parallel: fsdp)
        state = sharded.read_state(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{path}: not an sbtrain checkpoint (no {FORMAT!r} marker)")
        return {**state, "sharded": str(path.resolve())}
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"{path}: a link to {os.readlink(path)}, which is gone; restore that folder, or "
            "remove the link to start afresh"
        )
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


# ---------------------------------------------------------------------------------------------
# training state: where a run resumes from, what it must match, its random state


def resume_point(
    save_dir: str | Path, restore_file: str | None
) -> tuple[Path | None, dict | None, bool]:
    """Which checkpoint a run starts from, its contents, and whether it is the run's own:
    save_dir/checkpoint_last.pt when it exists, else `restore_file` if given, else none."""
    last = Path(save_dir) / "checkpoint_last.pt"
    if last.exists() or last.is_symlink():  # a file, or a link to a sharded checkpoint's folder
        # (a link whose folder is gone: load says so, rather than a silent fresh start)
        return last, load(last), True
    if restore_file:
        return Path(restore_file), load(restore_file), False
    return None, None, False


def check_compatible(state: dict, recipe: Recipe, model: nn.Module, path: Path) -> None:
    """Refuse weights of another task or architecture, naming the first difference."""
    old_task = state["recipe"].get("task", "lm")
    if old_task != recipe.task:
        raise UserError(
            f"{path} holds a {old_task} model, the recipe is {recipe.task}: "
            "use another train.save_dir"
        )
    # the saved recipe read as a Recipe, so keys added since it was written take their defaults
    old = recipe_from_dict(state["recipe"], str(path), trusted=True).model
    for key in get_task(recipe).architecture():
        if getattr(old, key) != getattr(recipe.model, key):
            raise UserError(
                f"{path} holds a model with model.{key}={_shown(getattr(old, key))}, the recipe "
                f"has {_shown(getattr(recipe.model, key))}: use another train.save_dir, or a "
                "matching --restore-file"
            )
    mine = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if "sharded" in state:
        theirs = sharded.shapes(Path(state["sharded"]))
    else:
        theirs = {name: tuple(t.shape) for name, t in state["model"].items()}
    missing = sorted(set(mine) - set(theirs))
    if missing:
        raise UserError(
            f"{path} lacks {missing[0]} of this recipe's model: use another train.save_dir"
        )
    for name, shape in theirs.items():
        if mine.get(name) != shape:
            want = mine.get(name, "no such tensor")
            raise UserError(
                f"{path}: {name} has shape {shape}, this recipe's model has {want} (another "
                "vocabulary or context length?): use another train.save_dir"
            )


def _shown(value):
    """A recipe value as a recipe spells it (the attention section as its kind and options)."""
    if isinstance(value, AttentionConfig):
        return {"kind": value.kind, **value.options()}
    return list(value) if isinstance(value, tuple) else value


def prepare_save_dir(save_dir: Path) -> None:
    """Create train.save_dir and prove it writable, before any training happens."""
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f"{TEMP_PREFIX}probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"train.save_dir={save_dir}: cannot write there ({e.strerror or type(e).__name__}); "
            "choose a writable folder"
        ) from None


def rng_states(layout: Layout) -> list[dict]:
    """The RNG state of every process (a collective under DDP: every process takes part)."""
    rng = {"torch": torch.get_rng_state()}
    if layout.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(layout.device)
    if not dist.is_initialized():
        return [rng]
    rngs = [None] * layout.world_size
    dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rngs: list[dict], layout: Layout) -> None:
    """Set this process's RNG from `rng_states` of a run with as many processes (else keep)."""
    if len(rngs) != layout.world_size:
        return
    rng = rngs[layout.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and layout.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], layout.device)


def save_training(
    state: dict, save_dir: Path, names: list[str], keep_last: int, main: bool, shards=None
) -> None:
    """`state` as save_dir/names[0], also named names[1:] (numbered, best); old numbered ones
    beyond `keep_last` removed. The main process writes it; with `shards` (model, optimizer),
    a sharded checkpoint (sbtrain.sharded) that every process writes its part of, `state`
    holding the rest."""
    if shards is not None:
        sharded.save({"format": FORMAT, **state}, *shards, save_dir, names, main)
    elif main:
        save(state, save_dir / names[0], [save_dir / name for name in names[1:]])
    if main:
        prune(save_dir, keep_last)
        sharded.remove_unnamed(save_dir)


# ---------------------------------------------------------------------------------------------
# a model to evaluate


class Loaded(NamedTuple):
    model: nn.Module  # in eval mode, on the device asked for
    recipe: Recipe
    task: Task
    state: dict  # the checkpoint's contents


def load_model(
    path: str | Path,
    device: torch.device,
    attention: dict | None = None,
    attention_impl: str | None = None,
) -> Loaded:
    """The model of a checkpoint (its recipe gives the architecture), ready for evaluation.

    `attention` ({"kind": ..., options}) swaps every layer's attention kernel for another kind:
    the projections are kept; the new kernel's random buffers are drawn from train.seed.
    `attention_impl` (auto | pytorch | fused) replaces the recipe's train.attention_impl.
    """
    state = load(path)
    tree = recipe_from_dict(state["recipe"], str(path), trusted=True).to_dict()

    def kept(name: str) -> bool:  # a swap drops the old kernel's buffers
        return attention is None or ".kernel." not in name

    if attention is not None:
        tree["model"] = {**tree["model"], "attention": attention}
    if attention_impl is not None:
        tree["train"] = {**tree["train"], "attention_impl": attention_impl}
    recipe = recipe_from_dict(tree, source=f"{path} (--attention)" if attention else str(path))
    task = get_task(recipe)
    model_args = state.get("model_args") or {"vocab_size": int(state["vocab_size"])}
    model = build_model(recipe, **model_args)
    if "sharded" in state:  # a folder of shards: read whole, into this one process's model
        sharded.load(Path(state["sharded"]), model, keep=kept)
        dispatch.check_device(recipe.train.attention_impl, device)
        return Loaded(model.to(device).eval(), recipe, task, state)
    weights = {name: t for name, t in state["model"].items() if kept(name)}
    try:
        missing, _ = model.load_state_dict(weights, strict=attention is None)
    except RuntimeError:
        raise UserError(
            f"{path}: its weights do not fit the model its own recipe describes "
            "(written by another sbtrain version?); use another checkpoint"
        ) from None
    if any(".kernel." not in key for key in missing):
        raise UserError(f"{path}: weights missing for {missing[0]}; use another checkpoint")
    dispatch.check_device(recipe.train.attention_impl, device)
    return Loaded(model.to(device).eval(), recipe, task, state)
