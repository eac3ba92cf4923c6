"""Classification end to end on a tiny generated ListOps (and Pathfinder): sbtrain preprocess,
train (loss, accuracy, resume bit for bit, DDP, precisions), eval-ppl (--json, --attention)."""

from __future__ import annotations

import json
import math
import signal
import subprocess

import numpy as np
import pytest
import torch

from cli.main import main
from sbtrain import checkpoint
from sbtrain.checkpoint import load_model
from sbtrain.lra.format import open_split
from tests.conftest import ROOT, one_error_line, read_jsonl, subprocess_env
from tests.integration.test_train import (
    TORCHRUN,
    losses,
    run_child,
    same_weights,
    start_child,
    wait_for_lines,
)

LISTOPS = ROOT / "recipes" / "lra" / "listops-cpu.yaml"
PATHFINDER = ROOT / "recipes" / "lra" / "pathfinder-cpu.yaml"
TINY_LISTOPS = [  # 200 / 50 / 50 trees of 20-60 tokens
    "listops.train=200", "listops.valid=50", "listops.test=50", "listops.min_tokens=20",
    "listops.max_tokens=60",
]  # fmt: skip


@pytest.fixture(scope="session")
def listops_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lra") / "listops"
    assert main(["preprocess", str(LISTOPS), *TINY_LISTOPS, f"data.dir={folder}"]) == 0
    return folder


def train_args(data, save_dir, *overrides, recipe=LISTOPS):
    return [
        "train", str(recipe), f"data.dir={data}", f"train.save_dir={save_dir}",
        "data.tokens_per_sample=60", "train.batch_size=20", "train.log_interval=10",
        "optim.warmup_updates=20", "optim.lr=3.0e-3", *overrides,
    ]  # fmt: skip


def test_preprocess_writes_the_splits_and_refuses_to_overwrite(listops_folder, capsys):
    meta = json.loads((listops_folder / "meta.json").read_text())
    assert meta["task"] == "listops" and meta["splits"] == ["train", "valid", "test"]
    sizes = {s: len(open_split(listops_folder, s)) for s in meta["splits"]}
    assert sizes == {"train": 200, "valid": 50, "test": 50}
    lengths = open_split(listops_folder, "train").lengths()
    assert lengths.min() >= 20 and lengths.max() <= 60
    before = {p.name: p.read_bytes() for p in listops_folder.iterdir()}
    args = ["preprocess", str(LISTOPS), *TINY_LISTOPS, f"data.dir={listops_folder}"]
    assert main([*args, "listops.seed=5"]) == 2
    assert "output folder exists; pass --force" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in listops_folder.iterdir()} == before
    assert not list(listops_folder.parent.glob(f".{listops_folder.name}.tmp-*"))


def test_preprocess_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    image = ROOT / "recipes" / "lra" / "image.yaml"
    cases = [
        ([str(image), f"data.raw={tmp_path / 'nowhere'}"], "not found; point it at"),
        (
            [str(LISTOPS), "listops.min_tokens=80", "listops.max_tokens=60"],
            "listops.min_tokens: must be <= max_tokens=60",
        ),
        ([str(LISTOPS), "--trainpref", str(image)], "are for language models"),
        ([str(LISTOPS), "model.output=adaptive"], "unknown key model.output"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["preprocess", *args, f"data.dir={out}"]) == 2, args
        assert message in one_error_line(capsys)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.slow
def test_listops_learns_and_eval_reports_accuracy(listops_folder, tmp_path, capsys):
    save = tmp_path / "run"
    assert main(train_args(listops_folder, save, "train.max_updates=200",
                           "train.validate_interval=50")) == 0  # fmt: skip
    records = read_jsonl(save / "train.jsonl")
    # one scored target per example: examples, not tokens, per update and per second
    assert records[0]["bsz"] == 20 and "eps" in records[0]
    assert not {"wpb", "wps"} & records[0].keys()
    assert records[-1]["nll_nats"] < records[0]["nll_nats"] - 0.5
    valid = read_jsonl(save / "valid.jsonl")
    # at every epoch's end (10 updates) and every 50: once each
    assert [r["update"] for r in valid] == list(range(10, 201, 10)) and valid[0]["tokens"] == 50
    capsys.readouterr()
    ckpt = save / "checkpoint_last.pt"
    assert main(["eval-ppl", str(ckpt), "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"split", "examples", "loss_nats", "accuracy"} <= result.keys()
    assert result["split"] == "train" and result["examples"] == 200
    # the truth: each document alone (no padding), argmax of the logits against the labels file
    split = open_split(listops_folder, "train")
    model, *_ = load_model(ckpt, torch.device("cpu"))
    hits, nll = 0, 0.0
    with torch.no_grad():
        for i in range(len(split)):
            tokens, label = split[i]
            x = torch.from_numpy(np.asarray(tokens, np.int64))[None]
            logits = model(x, torch.tensor([x.shape[1]])).double()
            hits += int(logits.argmax()) == label
            nll -= torch.log_softmax(logits, -1)[0, label].item()
    assert result["accuracy"] == pytest.approx(hits / 200, abs=1e-9)
    assert result["loss_nats"] == pytest.approx(nll / 200, rel=1e-4)
    majority = np.bincount(split.labels).max() / len(split)
    assert result["accuracy"] > 1.5 * majority  # learnt, not the most common class
    # another attention kind on the same weights; and options for language models are refused
    swap = ["--attention", "local", "window=8", "--json"]
    assert main(["eval-ppl", str(ckpt), "--split", "valid", *swap]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert swapped["attention"] == "local" and swapped["examples"] == 50
    assert main(["eval-ppl", str(ckpt), "--by-position", "8"]) == 2
    assert "--by-position is for language models" in one_error_line(capsys)
    assert main(["eval-ppl", str(ckpt), "--split", "test"]) == 0
    assert "50 examples" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_then_rerun_gives_the_same_run_bit_for_bit(listops_folder, tmp_path):
    overrides = ["train.max_updates=60", "train.log_interval=1", "train.validate_interval=7"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_child(train_args(listops_folder, whole, *overrides)).returncode == 0
    proc = start_child(train_args(listops_folder, cut, *overrides))
    assert wait_for_lines(cut, 15, proc)  # mid-epoch: 10 updates per epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert run_child(train_args(listops_folder, cut, *overrides)).returncode == 0
    assert losses(cut) == losses(whole)
    assert losses(cut, "valid.jsonl") == losses(whole, "valid.jsonl")
    assert same_weights(cut / "checkpoint_last.pt", whole / "checkpoint_last.pt")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(listops_folder, tmp_path):
    """Micro-batches of different lengths on each process (padding to each one's longest)."""
    common = ["train.max_updates=10", "train.log_interval=1", "train.micro_batch_size=5"]
    one = run_child(train_args(listops_folder, tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*TORCHRUN, "-m", "sbtrain", *train_args(listops_folder, tmp_path / "two", *common)],
        env=subprocess_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [u for u, _ in a] == [u for u, _ in b] == list(range(1, 11))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)


def test_precisions_and_mean_pooling_train_finite(listops_folder, tmp_path):
    for precision in ("bf16", "fp16"):
        save = tmp_path / precision
        extra = [f"train.precision={precision}", "model.pooling=mean", "model.d_model=32"]
        assert main(train_args(listops_folder, save, "train.max_updates=4", *extra)) == 0
        records = read_jsonl(save / "valid.jsonl")
        assert all(math.isfinite(r["loss"]) for r in records)
        state = checkpoint.load(save / "checkpoint_last.pt")
        assert state["counters"]["updates"] == 4


@pytest.mark.slow
def test_pathfinder_trains_on_generated_images(tmp_path):
    data = tmp_path / "pf"
    gen = ["pathfinder.train=64", "pathfinder.valid=16", "pathfinder.test=16"]
    assert main(["preprocess", str(PATHFINDER), *gen, f"data.dir={data}"]) == 0
    save = tmp_path / "run"
    args = [
        "train", str(PATHFINDER), f"data.dir={data}", f"train.save_dir={save}",
        "train.batch_size=16", "train.max_updates=8", "train.log_interval=4",
    ]  # fmt: skip
    assert main(args) == 0
    valid = read_jsonl(save / "valid.jsonl")
    assert valid[-1]["tokens"] == 16 and 0.0 <= valid[-1]["accuracy"] <= 1.0
