"""Recipes: YAML mapped onto frozen dataclasses, with dotted `key=value` overrides.

Precedence: dataclass default < included base recipe < recipe < command line. Every field has a
default and a one-line doc (`help`), and its range check where it has one (`check`). Unknown keys,
wrong types and contradictions raise `ConfigError` naming the key and the file.

This module knows no task and no attention kernel: a recipe's shape (which data, model and own
settings section it has) is a `Schema` the task layer supplies, and the task layer checks what
depends on the task (sbtrain.tasks.load_recipe reads a recipe whole).

    tree = read_tree("recipes/wt103.yaml", ["model.n_layers=4"])
    recipe = build_recipe(tree, Schema(model=DecoderConfig, data=TextDataConfig), "wt103.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sbtrain.errors import UserError


class ConfigError(UserError):
    """A recipe or override that cannot be used."""


CHECKS = {  # opt(check=...): a predicate over the value (each item of a tuple) and its message
    "positive": (lambda v: v > 0, "must be positive"),
    "non-negative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def opt(default: Any, help: str, check: str | None = None) -> Any:
    """A dataclass field with its default, one-line documentation and range check (a CHECKS
    name; None, the value of an optional field, is never checked)."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """Base of recipe sections: range checks from the fields' `check`, then `contradictions`;
    a bad value raises ValueError("key: why"), which the builder turns into a ConfigError
    naming the file and the dotted key."""

    def __post_init__(self) -> None:
        for f in fields(self):
            rule, value = f.metadata.get("check"), getattr(self, f.name)
            if rule is None or value is None:
                continue
            holds, why = CHECKS[rule]
            if not all(holds(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{f.name}: {why}, got {_plain(value)!r}")
        for key, why in self.contradictions():
            raise ValueError(f"{key}: {why}")

    def contradictions(self) -> Iterator[tuple[str, str]]:
        """(key, why) for each combination of values this section cannot take."""
        return iter(())

    def unread(self) -> set[str]:
        """Fields the other values make irrelevant: left out of the printed recipe."""
        return set()


# ---------------------------------------------------------------------------------------------
# the shared sections

# The sinusoid table added to the token embeddings is scaled to their initial rms (N(0, 0.02),
# GPT-2's init, which the blocks are initialised for): sin and cos have rms 1/sqrt(2), so the
# table is multiplied by 0.02 * sqrt(2), the scale a learned position table starts at. At
# amplitude 1 (before) the positions swamped the tokens 35 to 1 and such models trained ~2.5x
# worse (README, length generalisation).
SINUSOID_SCALE = 0.02 * 2**0.5


@dataclass(frozen=True)
class AttentionConfig(Section):
    """Which attention every layer uses; options a kind does not take are an error (checked with
    the kind by sbtrain.attention when the task layer reads the recipe).

    See sbtrain/attention/README.md for each kind's semantics and cost.
    """

    kind: str = opt("full", "full | local | performer | lsh | scatterbrain")
    sparse: str | None = opt(None, "scatterbrain's exact part: local | lsh | local+lsh")
    window: int | None = opt(
        None, "local: how many most recent keys (itself included) each query sees"
    )
    n_features: int | None = opt(None, "performer: random features, both halves counted")
    n_hashes: int | None = opt(None, "lsh: hash rounds")
    bucket_size: int | None = opt(None, "lsh: most recent same-bucket keys a query sees per round")
    n_buckets: int | None = opt(None, "lsh: buckets per hash round")
    chunk_size: int | None = opt(None, "performer: chunk length of the causal prefix sums")
    seed: int | None = opt(None, "seed of the random projections (default: drawn from train.seed)")
    features: str | None = opt(
        None, "performer, scatterbrain: feature map favor+ (default) | simplex | favor++"
    )

    def options(self) -> dict[str, Any]:
        """The options that were set, as keyword arguments for `build_attention`."""
        return {name: getattr(self, name) for name in self.set_options()}

    def set_options(self) -> list[str]:
        return [
            f.name for f in fields(self) if f.name != "kind" and getattr(self, f.name) is not None
        ]

    def unread(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is None}


@dataclass(frozen=True)
class DataConfig(Section):
    """Where a task's preprocessed data lives (and what preprocess reads)."""

    raw: str | None = opt(None, "preprocess input (null: the task generates its data)")
    dir: str = opt("data/bin", "preprocess output and training input")
    tokens_per_sample: int = opt(
        2048,
        "the longest sequence: language models' context, classifiers' longest document",
        "positive",
    )
    workers: int = opt(1, "preprocess: worker processes", "positive")

    def unread(self) -> set[str]:
        return {"raw"} if self.raw is None else set()


@dataclass(frozen=True)
class TextDataConfig(DataConfig):
    """Raw text and its tokenizer (language modelling)."""

    raw: str | None = opt(
        None, "preprocess input: a folder with wiki.{train,valid,test}.{tokens,raw}"
    )
    tokenizer: str = opt(
        "word",
        "word | sentencepiece | bpe, a path to a tokenizer model file, or hf:PATH (the "
        "tokenizer of a transformers model folder)",
    )
    vocab_size: int | None = opt(
        None, "word: vocabulary cap; subword: target vocabulary size", "positive"
    )
    min_count: int = opt(1, "word: keep words seen at least this often in train", "positive")
    spm_model_type: Literal["unigram", "bpe"] = opt("unigram", "sentencepiece model type")
    tokenizer_sample_mb: float = opt(
        20.0, "sentencepiece | bpe: MB of train text (evenly spread lines) to fit on", "positive"
    )


@dataclass(frozen=True)
class ModelConfig(Section):
    """The transformer every task builds on."""

    n_layers: int = opt(16, "transformer blocks", "positive")
    n_heads: int = opt(8, "attention heads per block", "positive")
    d_model: int = opt(512, "residual stream width", "positive")
    d_ff: int = opt(
        2048,
        "feed-forward hidden width (0: attention-only blocks, as Zoology's MQAR models)",
        "non-negative",
    )
    dropout: float = opt(
        0.1, "dropout on embeddings, attention output and feed-forward", "fraction"
    )
    positions: Literal["learned", "sinusoidal", "rope"] = opt(
        "learned",
        "learned (a table of the context length) | sinusoidal (added, any length) | rope (rotary "
        "on queries and keys, any length)",
    )
    sinusoid_scale: float = opt(
        SINUSOID_SCALE,
        "sinusoidal: the table's scale (checkpoints before it existed: 1.0)",
        "positive",
    )
    attention: AttentionConfig = opt(AttentionConfig(), "attention of every layer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def contradictions(self) -> Iterator[tuple[str, str]]:
        if self.d_model % self.n_heads:
            yield "d_model", f"{self.d_model} is not divisible by model.n_heads={self.n_heads}"
        elif self.positions == "rope" and self.head_dim % 2:
            yield "positions", f"rope needs an even head size, d_model/n_heads is {self.head_dim}"

    def unread(self) -> set[str]:
        return set() if self.positions == "sinusoidal" else {"sinusoid_scale"}


@dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """A causal language model: the transformer and its output layer."""

    output: Literal["softmax", "adaptive"] = opt("softmax", "softmax (tied) | adaptive softmax")
    adaptive_cutoffs: tuple[int, ...] = opt(
        (20000, 60000), "adaptive softmax cluster cutoffs", "positive"
    )
    adaptive_div_value: float = opt(
        4.0, "adaptive softmax: width divisor per tail cluster", "positive"
    )

    def contradictions(self) -> Iterator[tuple[str, str]]:
        yield from super().contradictions()
        if list(self.adaptive_cutoffs) != sorted(set(self.adaptive_cutoffs)):
            yield "adaptive_cutoffs", "must be increasing positive integers"

    def unread(self) -> set[str]:
        adaptive = {"adaptive_cutoffs", "adaptive_div_value"} if self.output == "softmax" else set()
        return super().unread() | adaptive


@dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    """A sequence classifier: the transformer, not causal, and how it pools."""

    pooling: Literal["cls", "mean"] = opt(
        "cls", "a CLS token in front | the mean over the real tokens"
    )


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = opt(1.0e-4, "peak learning rate", "positive")
    weight_decay: float = opt(
        0.01, "AdamW decoupled weight decay (not on norms, biases, embeddings)", "non-negative"
    )
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas", "fraction")
    eps: float = opt(1.0e-8, "AdamW epsilon", "non-negative")
    schedule: Literal["cosine", "inverse_sqrt", "linear", "constant"] = opt(
        "cosine", "learning-rate schedule after warmup"
    )
    warmup_updates: int = opt(4000, "linear warmup from 0 to lr", "non-negative")
    min_lr_ratio: float = opt(0.0, "cosine/linear: final lr as a fraction of lr", "unit")
    clip_norm: float = opt(1.0, "gradient clipping by global norm (0: off)", "non-negative")


@dataclass(frozen=True)
class TrainConfig(Section):
    batch_size: int = opt(12, "sequences per update, all processes together", "positive")
    micro_batch_size: int | None = opt(
        None, "sequences per forward pass per process (default: all)", "positive"
    )
    max_epochs: int = opt(100, "stop after this many epochs", "positive")
    max_updates: int | None = opt(
        None, "stop after this many updates (also sets the lr schedule)", "positive"
    )
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "bf16", "fp32 | bf16 autocast | fp16 + loss scaling"
    )
    save_dir: str = opt("checkpoints/run", "checkpoints, train.jsonl, TensorBoard logs")
    seed: int = opt(1, "seed of weights, data order and dropout")
    redraw_interval: int | None = opt(
        None,
        "updates between new random projections of every attention layer (null: never)",
        "positive",
    )
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    log_interval: int = opt(10, "updates between log lines", "positive")
    validate_interval: int | None = opt(
        None, "updates between validations (always at epoch end)", "positive"
    )
    max_valid_batches: int | None = opt(
        None, "cap on validation batches (default: whole split)", "positive"
    )
    save_interval: int | None = opt(
        None, "updates between numbered checkpoints (default: epoch end)", "positive"
    )
    keep_last: int = opt(3, "numbered checkpoints to keep (0: keep all)", "non-negative")
    patience: int | None = opt(
        None, "stop after this many validations without improvement", "positive"
    )
    best_checkpoint_metric: Literal["loss", "accuracy"] | None = opt(
        None,
        "what checkpoint_best.pt and patience follow: loss | accuracy (default: accuracy for tasks "
        "that count correct predictions, else loss)",
    )
    loss_scale_init: float = opt(
        2.0**16, "fp16: initial loss scale (halved on overflow)", "positive"
    )
    compile: bool = opt(False, "torch.compile the model")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "several processes: ddp (each holds the whole model) | fsdp (FSDP2: parameters, "
        "gradients and optimizer states sharded; checkpoints as torch.distributed.checkpoint)",
    )
    context_parallel: int = opt(
        1, "processes sharing each sequence, a contiguous chunk each (language models)", "positive"
    )
    attention_impl: Literal["auto", "pytorch", "fused"] = opt(
        "auto", "scatterbrain (local), performer: auto (fused where it serves) | pytorch | fused"
    )
    activation_checkpointing: bool = opt(
        False, "recompute each block in the backward pass: keep one tensor per block"
    )
    tensorboard: bool = opt(True, "write TensorBoard scalars to {save_dir}/tb")

    def contradictions(self) -> Iterator[tuple[str, str]]:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            yield "micro_batch_size", f"{self.micro_batch_size} does not divide train.batch_size"


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True)
class Schema:
    """The shape of a task's recipe: the classes of its data and model sections and of its own
    settings section (printed under the task's name; None: it has none)."""

    model: type = DecoderConfig
    data: type | None = TextDataConfig
    settings: type | None = None


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe. `settings` is the task's own section (`copy:`, `listops:`, ...), `data`
    None for a task that reads no files (copy)."""

    task: str
    model: ModelConfig = field(default_factory=DecoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig | None = None
    settings: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), fields the recipe does not read left out:
        YAML- and checkpoint-safe, and read back into the same recipe."""
        tree: dict[str, Any] = {"task": self.task}
        if self.settings is not None:
            tree[self.task] = _plain(self.settings)
        if self.data is not None:
            tree["data"] = _plain(self.data)
        tree.update(model=_plain(self.model), optim=_plain(self.optim), train=_plain(self.train))
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> Recipe:
        """A copy with some sections' fields replaced: `recipe.replace(train={"seed": 2})`."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in sections.items()
        }
        return dataclasses.replace(self, **changed)


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        skip = value.unread()
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.name not in skip}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_recipe(
    tree: Mapping[str, Any], schema: Schema, source: str, trusted: bool = False
) -> Recipe:
    """The Recipe of a nested mapping (a recipe file or a checkpoint's copy) with `schema`'s
    sections; a ConfigError naming the file and key for anything unknown, mistyped or out of
    range. `trusted` (a tree sbtrain wrote): keys the schema does not take are dropped first."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {tree!r}")
    task = tree.get("task")
    sections = {"model": schema.model, "optim": OptimConfig, "train": TrainConfig}
    if schema.data is not None:
        sections["data"] = schema.data
    if schema.settings is not None:
        sections[task] = schema.settings
    if trusted:
        tree = {
            "task": task,
            **{k: fit(v, sections[k]) for k, v in tree.items() if k in sections and v is not None},
        }
    for key in tree:
        if key != "task" and key not in sections:
            close = difflib.get_close_matches(str(key), sections, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key}{hint}")
    built = {
        name: build(cls, tree.get(name) or {}, f"{name}.", source) for name, cls in sections.items()
    }
    return Recipe(
        task=task,
        model=built["model"],
        optim=built["optim"],
        train=built["train"],
        data=built.get("data"),
        settings=built.get(task) if schema.settings is not None else None,
    )


def fit(tree: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The keys of a trusted `tree` (a recipe an sbtrain checkpoint holds) that `cls`'s fields
    take, recursively; a null where a field takes no null is left out too (the default then)."""
    hints = typing.get_type_hints(cls)
    kept = {}
    for f in fields(cls):
        if f.name not in tree:
            continue
        value, hint = tree[f.name], hints[f.name]
        if value is None and type(None) not in typing.get_args(hint):
            continue
        if is_dataclass(hint) and isinstance(value, Mapping):
            value = fit(value, hint)
        kept[f.name] = value
    return kept


# ---------------------------------------------------------------------------------------------
# reading


def read_tree(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """A recipe file (following `include:`) with `key=value` overrides applied, as a tree."""
    return apply_overrides(_read_file(Path(path), seen=()), overrides)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    tree = _copy_tree(tree)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.n_layers=4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[leaf] = value
    return tree


def _read_file(path: Path, seen: tuple[Path, ...], included_by: Path | None = None) -> dict:
    if not path.is_file():
        if included_by is not None:
            raise ConfigError(f"{included_by}: included recipe {path} not found")
        raise ConfigError(
            f"{path}: recipe not found (give the path of a YAML file, e.g. recipes/debug.yaml)"
        )
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(
            f"{path}:{line} not valid YAML ({type(e).__name__}); fix the syntax"
        ) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}"
        )
    base = tree.pop("include", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: include must be a file name")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: include cycle through {base}")
    return _merge(_read_file(base_path, (*seen, base_path), path), tree)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge; `attention` sections replace whole, since their options depend on the kind."""
    out = _copy_tree(base)
    for key, value in top.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (`model:`) keeps the base's
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "attention":
            out[key] = _merge(out[key], value)
        else:
            out[key] = _copy_tree(value)
    return out


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# building


def build(cls: type, tree: Any, prefix: str, source: str) -> Any:
    """`cls` (a dataclass) from a mapping, every value checked against its type hint."""
    if not isinstance(tree, Mapping):
        where = prefix.rstrip(".") or "the recipe"
        raise ConfigError(f"{source}: {where} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {dotted}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, source)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a Section's range check or contradiction: "key: why"
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint; returns it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if is_dataclass(hint):
        return build(hint, value if value is not None else {}, f"{key}.", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(map(str, args))
            raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        item = args[0]
        if args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(item, v, key, source) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. train.save_dir=2024
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value
