"""Weight-decay groups and learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
from torch import nn

from sbtrain.config import DecoderConfig, OptimConfig
from sbtrain.model import TransformerLM
from sbtrain.optim import lr_at, param_groups


def test_decay_applies_to_linear_weights_only():
    model = TransformerLM(DecoderConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32), 40, 8)
    decay, no_decay = param_groups(model, 0.1)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt", "linear", "constant"])
def test_warmup_is_linear_then_the_schedule_never_exceeds_the_peak(schedule):
    cfg = OptimConfig(lr=1.0, warmup_updates=10, schedule=schedule, min_lr_ratio=0.1)
    assert [lr_at(u, cfg, 100) for u in (1, 5, 10)] == [0.1, 0.5, 1.0]
    after = [lr_at(u, cfg, 100) for u in range(11, 101)]
    assert all(a >= b for a, b in itertools.pairwise(after)) and max(after) <= 1.0


def test_cosine_and_linear_end_at_the_floor_and_inverse_sqrt_decays_as_one_over_root():
    cos = OptimConfig(lr=2.0, warmup_updates=10, schedule="cosine", min_lr_ratio=0.1)
    lin = OptimConfig(lr=2.0, warmup_updates=10, schedule="linear", min_lr_ratio=0.0)
    inv = OptimConfig(lr=2.0, warmup_updates=10, schedule="inverse_sqrt")
    assert lr_at(100, cos, 100) == pytest.approx(0.2)
    assert lr_at(55, cos, 100) == pytest.approx(1.1)  # half way: the mean of peak and floor
    assert lr_at(100, lin, 100) == pytest.approx(0.0)
    assert lr_at(40, inv, 100) == pytest.approx(2.0 * math.sqrt(10 / 40))
