"""train.redraw_interval: new random projections every N updates, saved in checkpoints, so an
interrupted run resumes exactly; the seeds depend only on (train.seed, update)."""

from __future__ import annotations

import signal

import pytest
import torch

from sbtrain import checkpoint
from sbtrain.tasks import build_model, recipe_from_dict
from sbtrain.trainer import redraw_attention
from tests.integration.test_train import (
    losses,
    run_child,
    same_weights,
    start_child,
    train_args,
    wait_for_lines,
)

OVERRIDES = [
    "model.attention={kind: scatterbrain, window: 8, n_features: 8, features: simplex}",
    "train.redraw_interval=2",
    "train.max_updates=40",
    "train.log_interval=1",
]


def projections(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(".projection")}


@pytest.mark.slow
def test_redraw_every_2_updates_resumes_exactly(token_folder, tmp_path):
    whole = tmp_path / "whole"
    assert run_child(train_args(token_folder, whole, *OVERRIDES)).returncode == 0
    cut = tmp_path / "cut"
    proc = start_child(train_args(token_folder, cut, *OVERRIDES))
    assert wait_for_lines(cut, 15, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped_at = checkpoint.load(cut / "checkpoint_last.pt")["counters"]["updates"]
    assert 15 <= stopped_at < 40
    assert run_child(train_args(token_folder, cut, *OVERRIDES)).returncode == 0
    assert losses(cut) == losses(whole)  # exact floats
    assert same_weights(cut / "checkpoint_last.pt", whole / "checkpoint_last.pt")

    # the saved projections are the draw of update 40 (seed 1), not the initial one
    state = checkpoint.load(whole / "checkpoint_last.pt")
    model = build_model(recipe_from_dict(state["recipe"]), vocab_size=int(state["vocab_size"]))
    initial = {k: v.clone() for k, v in projections(model.state_dict()).items()}
    redraw_attention(model, 1, 40)
    drawn = projections(model.state_dict())
    saved = projections(state["model"])
    assert len(saved) == 2 and saved.keys() == drawn.keys()
    assert all(torch.equal(saved[k], drawn[k]) for k in saved)
    assert not any(torch.equal(saved[k], initial[k]) for k in saved)
    redraw_attention(model, 1, 38)
    assert not any(torch.equal(saved[k], v) for k, v in projections(model.state_dict()).items())
