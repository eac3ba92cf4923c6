"""Recipes: YAML onto frozen dataclasses, overrides, includes, and one-line errors."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sbtrain.config import ConfigError
from sbtrain.tasks import load_recipe, recipe_from_dict
from tests.conftest import ROOT


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_design_contract():
    r = recipe_from_dict({})
    assert (r.model.n_layers, r.model.n_heads, r.model.d_model) == (16, 8, 512)
    assert r.data.tokens_per_sample == 2048 and r.train.batch_size == 12


def test_every_field_has_a_one_line_doc():
    seen = []

    def walk(cls):
        seen.append(cls.__name__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert "\n" not in f.metadata["help"]
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    from sbtrain.config import OptimConfig, TrainConfig
    from sbtrain.tasks import TASKS

    for task in TASKS.values():
        for cls in (task.schema.model, task.schema.data, task.schema.settings):
            if cls is not None:
                walk(cls)
    walk(OptimConfig)
    walk(TrainConfig)
    assert {"TextDataConfig", "DecoderConfig", "EncoderConfig", "AttentionConfig",
            "CopySettings", "ListOpsConfig", "PathfinderConfig"} <= set(seen)  # fmt: skip


def test_precedence_default_then_include_then_file_then_command_line(tmp_path):
    write(tmp_path, "base.yaml", "model: {n_layers: 3, d_model: 128}\ntrain: {seed: 5}\n")
    path = write(tmp_path, "top.yaml", "include: base.yaml\nmodel: {n_layers: 4}\n")
    r = load_recipe(path, ["train.seed=9"])
    assert r.model.n_layers == 4  # file over include
    assert r.model.d_model == 128  # include over default
    assert r.train.seed == 9  # command line over all
    assert r.model.n_heads == 8  # default


def test_an_empty_section_keeps_the_included_one_and_numbers_fit_text_fields(tmp_path):
    write(tmp_path, "base.yaml", "model: {n_layers: 3}\n")
    path = write(tmp_path, "top.yaml", "include: base.yaml\nmodel:\ntrain: {save_dir: 2024}\n")
    r = load_recipe(path)
    assert r.model.n_layers == 3 and r.train.save_dir == "2024"


def test_attention_section_replaces_whole_across_includes(tmp_path):
    write(tmp_path, "base.yaml", "model: {attention: {kind: local, window: 16}}\n")
    path = write(tmp_path, "top.yaml", "include: base.yaml\nmodel: {attention: {kind: full}}\n")
    assert load_recipe(path).model.attention.options() == {}


def test_dotted_override_reaches_nested_attention(tmp_path):
    text = "model: {d_model: 64, n_heads: 4, attention: {kind: local, window: 16}}\n"
    path = write(tmp_path, "r.yaml", text)
    r = load_recipe(path, ["model.attention.window=8"])
    assert r.model.attention.window == 8


def test_float_from_yaml_exponent_without_dot(tmp_path):
    path = write(tmp_path, "r.yaml", "optim: {lr: 1e-4}\n")
    assert load_recipe(path).optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("model: {n_layer: 2}\n", [], "unknown key model.n_layer (did you mean model.n_layers?)"),
        ("model: {n_layers: two}\n", [], "model.n_layers must be int"),
        ("", ["train.bogus=1"], "unknown key train.bogus"),
        ("", ["model.dropout=high"], "model.dropout must be float"),
        ("model: {d_model: 100, n_heads: 8}\n", [], "not divisible by model.n_heads"),
        ("train: {precision: fp8}\n", [], "train.precision must be one of fp32 | bf16 | fp16"),
        ("model: {attention: {kind: full, window: 4}}\n", [], "does not take window"),
        (
            "model: {attention: {kind: nope}}\n",
            [],
            "model.attention: unknown attention kind 'nope'",
        ),
        ("model: [1, 2]\n", [], "model must be a mapping"),
        ("model: {n_layers: 2\n", [], "not valid YAML"),
        ("", ["model.n_layers"], "expected key=value"),
        ("train: {patience: 0}\n", [], "train.patience: must be positive"),
        ("task: copy\ncopy: {valid_size: 0}\n", [], "copy.valid_size: must be positive"),
        ("optim: {min_lr_ratio: 1.5}\n", [], "optim.min_lr_ratio: must be in [0, 1]"),
        ("train: {keep_last: -1}\n", [], "train.keep_last: must be >= 0"),
        ("train: {validate_interval: -5}\n", [], "train.validate_interval: must be positive"),
        ("include: nowhere.yaml\n", [], "included recipe"),
    ],
)
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, override, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    if not override or "=" in override[0]:
        assert "bad.yaml" in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips_through_a_plain_dict():
    r = load_recipe(ROOT / "recipes" / "debug.yaml", ["model.n_layers=3"])
    assert recipe_from_dict(r.to_dict()) == r


DEBUG_SIZE = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128"]
LENGTH = {"copy": "copy.length=31"}  # else data.tokens_per_sample=64


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_builds_its_model_at_debug_size(path):
    import torch

    from sbtrain.model import prepare_model
    from sbtrain.tasks import build_model, get_task

    task_name = load_recipe(path).task
    recipe = load_recipe(path, [*DEBUG_SIZE, LENGTH.get(task_name, "data.tokens_per_sample=64")])
    task = get_task(recipe)
    if task.unit == "examples":  # a classifier: 18 token ids, pad 18, CLS 19, 3 classes
        model = prepare_model(recipe, lambda: task.build_model(20, 3, 18, 19))
        task._pad_id = 18
        docs = [torch.randint(0, 18, (n,)) for n in (task.context_length, 5)]
        *inputs, labels = task.collate([(d,) * task.streams + (1,) for d in docs])
        logits = model(*inputs)
        assert logits.shape == (2, 3) and torch.isfinite(model.token_nll(logits, labels)).all()
        return
    vocab = recipe.settings.n_symbols + 1 if recipe.task == "copy" else 70_000  # > the cutoffs
    model = build_model(recipe, vocab_size=vocab)
    tokens = torch.randint(0, vocab, (2, task.context_length))
    nll, n = model.loss(tokens, tokens)
    assert torch.isfinite(nll) and n == tokens.numel()
