"""`sbtrain bench train` as a library: rows per length and checkpointing setting, the per-token
peak and the step's breakdown (small sizes; no timing assertions)."""

from __future__ import annotations

import functools
import json

import pytest

from sbtrain import bench
from sbtrain.bench.train import bench_train, main
from sbtrain.errors import UserError
from sbtrain.tasks import load_recipe
from tests.conftest import DEBUG_RECIPE, ROOT


def test_breakdown_parts_and_the_rest_add_up_to_the_step():
    recipe = load_recipe(
        DEBUG_RECIPE, ["data.tokens_per_sample=16", "train.activation_checkpointing=true"]
    )
    row = bench_train(recipe, 100, steps=1, warmup=0, breakdown=True, name="debug")["row"]
    assert row["recipe"] == "debug" and row["length"] == 16 and row["checkpointing"] is True
    parts = row["attention_ms"] + row["feed_forward_ms"] + row["output_ms"]
    assert min(row["attention_ms"], row["feed_forward_ms"], row["output_ms"]) > 0
    assert parts + row["other_ms"] == pytest.approx(row["step_ms"])
    assert row["peak_kib_per_token"] == pytest.approx(1024 * row["peak_rss_mib"] / (8 * 16))


def test_one_row_per_length_and_setting(tmp_path, monkeypatch):
    """In this process (spawning one per case is bench's own, tested with the attention bench)."""
    monkeypatch.setattr(bench, "in_fresh_process", lambda what, function, *args: function(*args))
    out = tmp_path / "train.json"
    main([str(DEBUG_RECIPE)], 1, 0, 100, [16, 32], "both", out=str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["length"], r["checkpointing"]) for r in rows] == [
        (16, False),
        (16, True),
        (32, False),
        (32, True),
    ]
    assert all(r["recipe"] == "debug" and r["tokens_per_s"] > 0 for r in rows)


def test_lengths_of_a_copy_recipe_are_refused():
    with pytest.raises(UserError, match=r"copy-task recipe; set its length with copy\.length"):
        main([str(ROOT / "recipes" / "copy.yaml")], lengths=[64])


def test_activations_counted_are_what_forward_keeps_for_backward():
    """bench.parallel.activation_mib on a two-layer network whose activations are known: at the
    forward pass's peak the ReLU's input and output (n x h floats each) are alive, with at most
    one (n x d) tensor beside them; parameters, gradients and AdamW moments (each at least d x h
    floats, more than n x d) are not counted."""
    import torch

    from sbtrain.bench.parallel import activation_mib

    d, h = 16, 1024

    def step(model, optimizer, x):
        model(x).square().sum().backward()
        optimizer.step()

    for n in (256, 512):  # n x d < d x h: one parameter counted would show
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, d))
        optimizer = torch.optim.AdamW(model.parameters())
        trainer = type("Trainer", (), {"model": model, "optimizer": optimizer})
        x = torch.randn(n, d)
        counted = activation_mib(functools.partial(step, model, optimizer, x), trainer)
        hidden, small = n * h * 4 / 2**20, n * d * 4 / 2**20  # (n, h) and (n, d) in fp32
        assert 2 * hidden <= counted <= 2 * hidden + small, (n, counted, hidden)
