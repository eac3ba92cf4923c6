"""The attention benchmarks as library functions (small instances; no timing assertions)."""

from __future__ import annotations

import os

import pytest

from sbtrain import bench
from sbtrain.bench.approx import (
    approx_errors,
    checkpoint_errors,
    equal_budget_kinds,
    format_rows,
    mean_error,
    stops_improving,
)
from sbtrain.bench.attention import SpeedRow, measure, memory_growth
from sbtrain.errors import UserError
from tests.conftest import one_error_line


def test_scatterbrain_is_no_worse_than_performer_with_the_same_features():
    """Averaged over both input regimes and a range of temperatures."""
    kinds = {
        "performer": ("performer", dict(n_features=16), 16),
        "scatterbrain": ("scatterbrain", dict(sparse="local", window=8, n_features=16), 24),
    }
    rows = approx_errors(kinds, length=128, heads=2, head_dim=16, temperatures=(1.0, 5.0, 20.0))
    assert len(rows) == 2 * 3 * 2
    assert mean_error(rows, "scatterbrain") <= mean_error(rows, "performer")
    assert "drift" in format_rows(rows)


def test_equal_budgets_count_what_a_query_pays_for():
    paid = {
        "local": lambda o: o["window"],
        "performer": lambda o: o["n_features"],
        "lsh": lambda o: o["n_hashes"] * o["bucket_size"],
        "scatterbrain": lambda o: o["window"] + o["n_features"],
    }
    kinds = equal_budget_kinds(64)
    assert {"performer-simplex", "scatterbrain-favor++"} <= set(kinds)
    for kind, options, budget in kinds.values():
        assert paid[kind](options) == budget == 64


def test_speed_and_memory_of_one_case_in_a_fresh_process():
    row = measure("local", "local", {"window": 16}, length=256, heads=2, head_dim=16, repeats=1)
    assert row.kind == "local" and row.length == 256 and row.ms > 0 and row.peak_mib >= 0
    rows = [SpeedRow("x", 1024, 1.0, 10.0), SpeedRow("x", 2048, 2.0, 21.0)]
    assert memory_growth(rows) == {"x": [2.1]}


def test_a_benchmark_process_that_dies_is_an_error_not_a_hang():
    # os.abort kills the process the way the kernel's OOM killer does: no exception, no result
    assert bench.in_fresh_process("pid", os.getpid) != os.getpid()
    with pytest.raises(UserError, match="the process measuring scatterbrain at 16k died"):
        bench.in_fresh_process("scatterbrain at 16k", os.abort)


@pytest.mark.parametrize("what", ["attention", "generate"])
def test_a_device_that_is_not_here_is_one_error_line(what, capsys):
    from cli.main import main

    assert main(["bench", what, "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in one_error_line(capsys)


@pytest.mark.parametrize(
    "args, says",
    [
        (["attention", "--lengths", "2048,-5"], "integers > 0"),
        (["attention", "--repeats", "0"], "--repeats: expected an integer >= 1"),
        (["generate", "--steps", "0"], "--steps: expected an integer >= 1"),
        (["approx", "--budget", "6"], "multiple of 4"),
        (["approx", "--length", "1"], "at least 2 positions"),
        (["approx", "--from-checkpoint", "missing.pt"], "missing.pt: checkpoint not found"),
        (["approx", "--from-checkpoint", "missing.pt", "--counts", "15"], "must be even"),
        (["train", "recipes/debug.yaml", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
        (["preprocess", "--megabytes", "0"], "megabytes > 0"),
    ],
)
def test_impossible_benchmark_sizes_are_one_error_line(args, says, capsys):
    from cli.main import main

    assert main(["bench", *args]) == 2
    assert says in one_error_line(capsys)


def test_checkpoint_errors_fall_as_features_grow(trained_debug, token_folder):
    """q, k, v captured from a trained model: every map's error falls with 64x the features."""
    rows = checkpoint_errors(
        str(trained_debug / "checkpoint_best.pt"), str(token_folder), blocks=2,
        counts=(8, 64, 512), seeds=2,
    )  # fmt: skip
    assert len(rows) == 2 * 3 * 3  # layers x maps x counts
    for layer in (0, 1):
        for name in ("favor+", "simplex", "favor++"):
            curve = {r["n_features"]: r["error"] for r in rows
                     if (r["layer"], r["features"]) == (layer, name)}  # fmt: skip
            assert 0 < curve[512] < 0.6 * curve[8]
    stops = stops_improving(rows)
    assert set(stops) == {"favor+", "simplex", "favor++"}


def test_stops_improving_is_where_no_further_doubling_gains_10_percent():
    curve = [(16, 1.0), (32, 0.95), (64, 0.5), (128, 0.46), (256, 0.45)]
    rows = [dict(features="m", layer=0, n_features=n, error=e) for n, e in curve]
    assert stops_improving(rows) == {"m": 64}
    rows = [dict(features="m", layer=0, n_features=n, error=1 / n) for n in (16, 32, 64)]
    assert stops_improving(rows) == {"m": None}
