"""Tasks: what to preprocess, train on and score, one class per `recipe.task`, from one dict —
the one place that knows task names.

    recipe = load_recipe("recipes/debug.yaml", ["train.max_updates=20"])   # read and checked
    task = get_task(recipe)
    task.preprocess(inputs, force)            # sbtrain preprocess: write data.dir
    data = task.training_data()               # .n_train, .valid, .train_set(epoch), .model_args
    model = task.build_model(**data.model_args)
    *inputs, targets = task.collate([dataset[i] for i in batch])
    nll = model.token_nll(model(*inputs), targets)      # (N,) nats of the scored targets

A task owns its recipe's shape (`Task.schema`): which data and model sections it reads and its
own section, written under its name (`copy:`, `listops:`, ...). The trainer, the evaluator and
checkpoints go through this interface only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sbtrain.attention import check_attention, fused_obstacle
from sbtrain.attention.context_parallel import CONTEXT_PARALLEL_KINDS
from sbtrain.config import ConfigError, Recipe, build_recipe, read_tree
from sbtrain.model import prepare_model
from sbtrain.tasks.base import Task, TrainingData
from sbtrain.tasks.classify import Classification, Image, ListOps, Pathfinder, Retrieval, Text
from sbtrain.tasks.lm import Copy, LanguageModelling
from sbtrain.tasks.recall import MQAR, Passkey, ScoredSequences, SelectiveCopy

__all__ = [
    "TASKS", "Classification", "Task", "TrainingData", "build_model", "get_task", "load_recipe",
    "recipe_from_dict",
]  # fmt: skip

LANGUAGE = (LanguageModelling, Copy)
CLASSIFIERS = (ListOps, Pathfinder, Text, Image, Retrieval)
RECALL = (ScoredSequences, MQAR, SelectiveCopy, Passkey)
TASKS: dict[str, type[Task]] = {task.name: task for task in (*LANGUAGE, *CLASSIFIERS, *RECALL)}
DEFAULT_TASK = "lm"


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (following `include:`), apply `key=value` overrides, validate.

    Raises ConfigError with one line naming the file and key when anything is wrong.
    """
    return recipe_from_dict(read_tree(path, overrides), source=str(path))


def recipe_from_dict(
    tree: Mapping[str, Any], source: str = "<recipe>", trusted: bool = False
) -> Recipe:
    """Build and check the recipe of a nested mapping. `trusted`: a recipe an sbtrain checkpoint
    holds, written by this or an earlier version: keys this version does not read are dropped
    (earlier versions stored every task's settings in every recipe)."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {tree!r}")
    name = tree.get("task", DEFAULT_TASK)
    if name not in TASKS:
        raise ConfigError(f"{source}: task must be one of {' | '.join(TASKS)}, got {name!r}")
    task = TASKS[name]
    others = [key for key in tree if key in TASKS and key != name]
    if others and not trusted:
        raise ConfigError(
            f"{source}: {others[0]}: settings of the {others[0]} task, but this recipe's task is "
            f"{name}; remove the section (or set task: {others[0]})"
        )
    if tree.get("data") is not None and task.schema.data is None and not trusted:
        raise ConfigError(
            f"{source}: data: the {name} task reads no data files (it makes its samples); "
            "remove the section"
        )
    if trusted:
        tree = upgrade(tree)
    recipe = build_recipe({**tree, "task": name}, task.schema, source, trusted)
    check(recipe, task, source)
    return recipe


def upgrade(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe an earlier sbtrain stored, in today's spelling: where a default changed, the value
    the earlier version used (sinusoidal tables had amplitude 1 before `sinusoid_scale`)."""
    model = dict(tree.get("model") or {})
    if model.get("positions") == "sinusoidal" and "sinusoid_scale" not in model:
        model["sinusoid_scale"] = 1.0
    return {**tree, "model": model}


def check(recipe: Recipe, task: type[Task], source: str) -> None:
    """What depends on the task: its attention (kind and options, causal or not) and the
    contradictions the task names."""
    model = recipe.model
    try:
        check_attention(
            model.attention.kind, head_dim=model.head_dim, causal=task.causal,
            **model.attention.options(),
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: model.attention: {e}") from None
    if recipe.train.attention_impl == "fused":
        options = {**model.attention.options(), "causal": task.causal}
        why = fused_obstacle(model.attention.kind, model.head_dim, **options)
        if why is not None:
            raise ConfigError(
                f"{source}: train.attention_impl: fused cannot run this model: {why}; use auto "
                "(fused where it serves) or pytorch"
            )
    if recipe.train.best_checkpoint_metric == "accuracy" and not task.counts_correct:
        raise ConfigError(
            f"{source}: train.best_checkpoint_metric: the {recipe.task} task counts no correct "
            "predictions; use loss"
        )
    if recipe.train.context_parallel > 1:
        why = context_parallel_obstacle(recipe, task)
        if why is not None:
            raise ConfigError(f"{source}: train.context_parallel: {why}")
    for key, why in task.contradictions(recipe):
        raise ConfigError(f"{source}: {key}: {why}")


def context_parallel_obstacle(recipe: Recipe, task: type[Task]) -> str | None:
    """Why this recipe's sequences cannot be split over train.context_parallel processes."""
    parts, attention = recipe.train.context_parallel, recipe.model.attention
    if task.unit != "tokens" or not task.causal or task.exact_match:
        return (
            f"it splits the sequences of language models; the {recipe.task} task scores whole ones"
        )
    if attention.kind not in CONTEXT_PARALLEL_KINDS or attention.sparse not in (None, "local"):
        what = attention.kind + (f" with sparse={attention.sparse}" if attention.sparse else "")
        return (
            f"{what} cannot be split (an LSH support reaches any earlier key); full, local, "
            "performer and scatterbrain with sparse=local can"
        )
    if recipe.train.attention_impl == "fused":
        return "the chunks run on the PyTorch path; use attention_impl auto or pytorch"
    length = task(recipe).context_length
    if length % parts:
        return f"{parts} does not divide the {length} positions of a sequence"
    window = attention.window or 0
    if length // parts < window:
        return f"chunks of {length // parts} positions are shorter than the window of {window}"
    return None


def get_task(recipe: Recipe) -> Task:
    return TASKS[recipe.task](recipe)


def build_model(recipe: Recipe, **model_args):
    """The model of `recipe`'s task (`model_args`: what its data gives, e.g. vocab_size),
    initialised from train.seed (the same on every process), with the recipe's attention_impl
    and activation checkpointing."""
    return prepare_model(recipe, lambda: get_task(recipe).build_model(**model_args))
