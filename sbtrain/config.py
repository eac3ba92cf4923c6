"""Recipes: YAML mapped onto frozen dataclasses, with dotted `key=value` overrides.

Precedence: dataclass default < included base recipe < recipe < command line. Every field has a
default and a one-line doc (`help`). Unknown keys, wrong types and contradictions raise
`ConfigError` naming the key and the file.

    recipe = load_recipe("recipes/wt103.yaml", ["model.n_layers=4", "train.max_updates=10"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sbtrain.errors import UserError


class ConfigError(UserError):
    """A recipe or override that cannot be used."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its default and one-line documentation."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention every layer uses; options a kind does not take are an error.

    See sbtrain/attention/README.md for each kind's semantics and cost.
    """

    kind: Literal["full", "local", "performer", "lsh", "scatterbrain"] = opt(
        "full", "full | local | performer | lsh | scatterbrain"
    )
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
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "kind" and getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class DataConfig:
    raw: str | None = opt(
        None,
        "preprocess input: lm: a folder with wiki.{train,valid,test}.{tokens,raw}; text: "
        "aclImdb; image: cifar-10-batches-py; retrieval: the folder of new_aan_pairs.*.tsv",
    )
    dir: str = opt("data/bin", "preprocess output and training input (binarized splits)")
    tokenizer: str = opt(
        "word",
        "word | sentencepiece | bpe, a path to a tokenizer model file, or hf:PATH (the "
        "tokenizer of a transformers model folder)",
    )
    vocab_size: int | None = opt(None, "word: vocabulary cap; subword: target vocabulary size")
    min_count: int = opt(1, "word: keep words seen at least this often in train")
    spm_model_type: Literal["unigram", "bpe"] = opt("unigram", "sentencepiece model type")
    tokens_per_sample: int = opt(
        2048,
        "lm: tokens per sample, the model's context (copy: 2|w|+1); classifiers: the longest "
        "document (a longer one is an error)",
    )
    workers: int = opt(1, "preprocess: binarization processes")
    tokenizer_sample_mb: float = opt(
        20.0, "preprocess, sentencepiece | bpe: MB of train text (evenly spread lines) to fit on"
    )


@dataclass(frozen=True)
class CopyConfig:
    n_symbols: int = opt(127, "copy task: symbols 1..N")
    length: int = opt(511, "copy task: |w|; a sample is `0 w 0 w`, 2|w|+2 tokens")
    train_size: int = opt(100_000, "copy task: training samples per epoch (fresh each epoch)")
    valid_size: int = opt(512, "copy task: validation samples (fixed)")
    test_size: int = opt(1024, "copy task: test samples (fixed)")


@dataclass(frozen=True)
class ListOpsConfig:
    """Sizes and settings of the generated ListOps (null: the Long Range Arena's value)."""

    train: int | None = opt(None, "listops: training examples (LRA: 96,000)")
    valid: int | None = opt(None, "listops: validation examples (LRA: 2,000)")
    test: int | None = opt(None, "listops: test examples (LRA: 2,000)")
    min_tokens: int | None = opt(None, "listops: shortest sequence kept, tokens (LRA: 500)")
    max_tokens: int | None = opt(None, "listops: longest sequence kept, tokens (LRA: 2,000)")
    max_depth: int | None = opt(None, "listops: tree levels, leaves included (LRA: 10)")
    max_args: int | None = opt(None, "listops: most arguments of an operator (LRA: 10)")
    seed: int | None = opt(None, "listops: generator seed (default 0)")

    def options(self) -> dict[str, Any]:
        """The settings that were set, as keyword arguments of sbtrain.lra's config."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class PathfinderConfig:
    """Sizes and settings of the generated Pathfinder (null: the generator's default)."""

    train: int | None = opt(None, "pathfinder: training images (LRA: 160,000)")
    valid: int | None = opt(None, "pathfinder: validation images (LRA: 20,000)")
    test: int | None = opt(None, "pathfinder: test images (LRA: 20,000)")
    size: int | None = opt(None, "pathfinder: image side in pixels, size**2 tokens (LRA: 32)")
    segments: int | None = opt(None, "pathfinder: pieces of each main path, the difficulty (8)")
    distractors: int | None = opt(None, "pathfinder: paths without markers (default 2)")
    seed: int | None = opt(None, "pathfinder: generator seed (default 0)")

    def options(self) -> dict[str, Any]:
        """The settings that were set, as keyword arguments of sbtrain.lra's config."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = opt(16, "transformer blocks")
    n_heads: int = opt(8, "attention heads per block")
    d_model: int = opt(512, "residual stream width")
    d_ff: int = opt(2048, "feed-forward hidden width")
    dropout: float = opt(0.1, "dropout on embeddings, attention output and feed-forward")
    positions: Literal["learned", "sinusoidal", "rope"] = opt(
        "learned",
        "learned (a table of tokens_per_sample) | sinusoidal (added, any length) | rope (rotary "
        "on queries and keys, any length)",
    )
    output: Literal["softmax", "adaptive"] = opt(
        "softmax", "language models: softmax (tied) | adaptive softmax"
    )
    pooling: Literal["cls", "mean"] = opt(
        "cls", "classifiers: a CLS token in front | the mean over the real tokens"
    )
    adaptive_cutoffs: tuple[int, ...] = opt((20000, 60000), "adaptive softmax cluster cutoffs")
    adaptive_div_value: float = opt(4.0, "adaptive softmax: width divisor per tail cluster")
    attention: AttentionConfig = opt(AttentionConfig(), "attention of every layer")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1.0e-4, "peak learning rate")
    weight_decay: float = opt(
        0.01, "AdamW decoupled weight decay (not on norms, biases, embeddings)"
    )
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas")
    eps: float = opt(1.0e-8, "AdamW epsilon")
    schedule: Literal["cosine", "inverse_sqrt", "linear", "constant"] = opt(
        "cosine", "learning-rate schedule after warmup"
    )
    warmup_updates: int = opt(4000, "linear warmup from 0 to lr")
    min_lr_ratio: float = opt(0.0, "cosine/linear: final lr as a fraction of lr")
    clip_norm: float = opt(1.0, "gradient clipping by global norm (0: off)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(12, "sequences per update, all processes together")
    micro_batch_size: int | None = opt(
        None, "sequences per forward pass per process (default: all)"
    )
    max_epochs: int = opt(100, "stop after this many epochs")
    max_updates: int | None = opt(None, "stop after this many updates (also sets the lr schedule)")
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "bf16", "fp32 | bf16 autocast | fp16 + loss scaling"
    )
    save_dir: str = opt("checkpoints/run", "checkpoints, train.jsonl, TensorBoard logs")
    seed: int = opt(1, "seed of weights, data order and dropout")
    redraw_interval: int | None = opt(
        None, "updates between new random projections of every attention layer (null: never)"
    )
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    log_interval: int = opt(10, "updates between log lines")
    validate_interval: int | None = opt(None, "updates between validations (always at epoch end)")
    max_valid_batches: int | None = opt(None, "cap on validation batches (default: whole split)")
    save_interval: int | None = opt(
        None, "updates between numbered checkpoints (default: epoch end)"
    )
    keep_last: int = opt(3, "numbered checkpoints to keep (0: keep all)")
    patience: int | None = opt(None, "stop after this many validations without improvement")
    loss_scale_init: float = opt(2.0**16, "fp16: initial loss scale (halved on overflow)")
    compile: bool = opt(False, "torch.compile the model")
    attention_impl: Literal["auto", "pytorch", "fused"] = opt(
        "auto", "scatterbrain (local), performer: auto (fused where it serves) | pytorch | fused"
    )
    activation_checkpointing: bool = opt(
        False, "recompute each block in the backward pass: keep one tensor per block"
    )
    tensorboard: bool = opt(True, "write TensorBoard scalars to {save_dir}/tb")


@dataclass(frozen=True)
class Recipe:
    task: Literal["lm", "copy", "listops", "pathfinder", "text", "image", "retrieval"] = opt(
        "lm",
        "lm (language modelling on binarized text) | copy | listops | pathfinder | text | image "
        "| retrieval (Long Range Arena classifiers)",
    )
    data: DataConfig = opt(DataConfig(), "data")
    copy: CopyConfig = opt(CopyConfig(), "copy task")
    listops: ListOpsConfig = opt(ListOpsConfig(), "listops task: what preprocess generates")
    pathfinder: PathfinderConfig = opt(
        PathfinderConfig(), "pathfinder task: what preprocess generates"
    )
    model: ModelConfig = opt(ModelConfig(), "model")
    optim: OptimConfig = opt(OptimConfig(), "optimisation")
    train: TrainConfig = opt(TrainConfig(), "training")

    @property
    def context_length(self) -> int:
        """Tokens the model sees per sample: a copy sample `0 w 0 w` less its last token."""
        return 2 * self.copy.length + 1 if self.task == "copy" else self.data.tokens_per_sample

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists): YAML- and checkpoint-safe."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (following `include:`), apply `key=value` overrides, validate.

    Raises ConfigError with one line naming the file and key when anything is wrong.
    """
    tree = _read_tree(Path(path), seen=())
    tree = apply_overrides(tree, overrides)
    return recipe_from_dict(tree, source=str(path))


def recipe_from_dict(tree: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe from a nested mapping (a recipe file or a checkpoint's copy)."""
    recipe = _build(Recipe, tree, prefix="", source=source)
    _check(recipe, source)
    return recipe


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


def _read_tree(
    path: Path, seen: tuple[Path, ...], included_by: Path | None = None
) -> dict[str, Any]:
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
    return _merge(_read_tree(base_path, (*seen, base_path), path), tree)


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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, tree: Any, prefix: str, source: str) -> Any:
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
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint; returns it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if is_dataclass(hint):
        return _build(hint, value if value is not None else {}, f"{key}.", source)
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


def _check(r: Recipe, source: str) -> None:
    """Contradictions between fields."""
    from sbtrain.attention import check_attention  # attention depends on nothing here

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    m = r.model
    t, o, c = r.train, r.optim, r.copy
    positive = {
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.d_model": m.d_model,
        "model.d_ff": m.d_ff,
        "data.tokens_per_sample": r.data.tokens_per_sample,
        "data.workers": r.data.workers,
        "copy.n_symbols": c.n_symbols,
        "copy.length": c.length,
        "copy.train_size": c.train_size,
        "copy.valid_size": c.valid_size,
        "copy.test_size": c.test_size,
        "train.batch_size": t.batch_size,
        "train.log_interval": t.log_interval,
        "train.max_epochs": t.max_epochs,
        "train.loss_scale_init": t.loss_scale_init,
        "optim.lr": o.lr,
        "model.adaptive_div_value": m.adaptive_div_value,
    }
    optional_positive = {  # null switches these off; a number must be positive
        "train.max_updates": t.max_updates,
        "train.micro_batch_size": t.micro_batch_size,
        "train.validate_interval": t.validate_interval,
        "train.save_interval": t.save_interval,
        "train.max_valid_batches": t.max_valid_batches,
        "train.patience": t.patience,
        "train.redraw_interval": t.redraw_interval,
        "data.vocab_size": r.data.vocab_size,
    }
    non_negative = {
        "train.keep_last": t.keep_last, "optim.warmup_updates": o.warmup_updates,
        "optim.weight_decay": o.weight_decay, "optim.clip_norm": o.clip_norm,
        "data.min_count": r.data.min_count, "optim.eps": o.eps,
    }  # fmt: skip
    for key, value in {**positive, **optional_positive}.items():
        if value is not None and value <= 0:
            fail(key, f"must be positive, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if not all(0.0 <= beta < 1.0 for beta in o.betas):
        fail("optim.betas", f"must be in [0, 1), got {list(o.betas)}")
    if m.d_model % m.n_heads:
        fail("model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
        fail(
            "model.positions",
            f"rope needs an even head size, d_model/n_heads is {m.d_model // m.n_heads}",
        )
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        fail("train.micro_batch_size", f"{t.micro_batch_size} does not divide train.batch_size")
    if (
        list(m.adaptive_cutoffs) != sorted(set(m.adaptive_cutoffs))
        or min(m.adaptive_cutoffs, default=1) <= 0
    ):
        fail("model.adaptive_cutoffs", "must be increasing positive integers")
    from sbtrain.tasks import TASKS  # tasks depend on config

    task = TASKS[r.task]
    try:
        check_attention(
            m.attention.kind,
            head_dim=m.d_model // m.n_heads,
            causal=task.causal,
            **m.attention.options(),
        )
    except (TypeError, ValueError) as e:
        fail("model.attention", str(e))
    for key, why in task.contradictions(r):
        fail(key, why)
