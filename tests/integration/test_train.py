"""`sbtrain train` end to end on the debug recipe: resume, crash safety, DDP, precision, errors."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import pytest
import torch

from cli.main import main
from sbtrain import checkpoint
from tests.conftest import DEBUG_RECIPE, read_jsonl, sbtrain_command, subprocess_env

TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "sbtrain",
]


def train_args(data, save_dir, *overrides):
    return [
        "train",
        str(DEBUG_RECIPE),
        f"data.dir={data}",
        f"train.save_dir={save_dir}",
        "train.tensorboard=false",
        *overrides,
    ]


def losses(save_dir):
    return [(r["update"], r["loss"]) for r in read_jsonl(save_dir / "train.jsonl")]


def run_child(args, **kwargs):
    return subprocess.run(
        sbtrain_command(*args), env=subprocess_env(), capture_output=True, text=True, **kwargs
    )


def wait_for_updates(save_dir, n, proc, timeout=60):
    log = save_dir / "train.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"no {n} updates within {timeout}s")


def test_loss_falls_and_logs_parse(token_folder, tmp_path, capsys):
    overrides = ["train.max_updates=60", "train.log_interval=5", "train.validate_interval=13"]
    assert main(train_args(token_folder, tmp_path, *overrides)) == 0
    records = read_jsonl(tmp_path / "train.jsonl")
    assert [r["update"] for r in records] == list(range(5, 61, 5))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # bits
    for key in ("loss", "ppl", "wps", "ups", "wpb", "bsz", "gnorm", "lr", "clip", "wall"):
        assert key in records[0]
    assert records[0]["ppl"] == pytest.approx(2 ** records[0]["loss"])
    assert records[0]["wpb"] == 8 * 64 and records[0]["bsz"] == 8
    valid = read_jsonl(tmp_path / "valid.jsonl")  # 39 updates per epoch: 39 is once, not twice
    assert [(r["update"], r["epoch"]) for r in valid] == [
        (13, 1),
        (26, 1),
        (39, 1),
        (52, 2),
        (60, 2),
    ]
    assert valid[-1]["tokens"] == 3000
    assert [p.name for p in checkpoint.numbered(tmp_path)] == ["checkpoint_1_39.pt"]
    assert (tmp_path / "recipe.yaml").is_file()
    best = checkpoint.load(tmp_path / "checkpoint_best.pt")
    assert best["recipe"]["model"]["d_model"] == 64 and best["counters"]["updates"] in {39, 60}
    assert "d_model: 64" in capsys.readouterr().out  # the resolved recipe is printed at start


def test_sigterm_then_rerun_gives_the_same_losses_bit_for_bit(token_folder, tmp_path):
    args = lambda d: train_args(token_folder, d, "train.max_updates=120", "train.log_interval=1")  # noqa: E731
    assert run_child(args(tmp_path / "whole")).returncode == 0
    proc = subprocess.Popen(
        sbtrain_command(*args(tmp_path / "cut")),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_updates(tmp_path / "cut", 45, proc)  # mid-epoch: 39 updates per epoch
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "rerun the same command" in err
    stopped_at = checkpoint.load(tmp_path / "cut" / "checkpoint_last.pt")["counters"]["updates"]
    assert 45 <= stopped_at < 120
    rerun = run_child(args(tmp_path / "cut"))
    assert rerun.returncode == 0 and f"at update {stopped_at}" in rerun.stdout
    assert losses(tmp_path / "cut") == losses(
        tmp_path / "whole"
    )  # exact floats, data order and dropout


@pytest.mark.slow
def test_twenty_kill9_at_random_moments_lose_nothing(token_folder, tmp_path):
    rng = random.Random(0)
    args = train_args(
        token_folder,
        tmp_path / "run",
        "train.max_updates=800",
        "train.log_interval=1",
        "train.save_interval=1",
        "train.keep_last=2",
    )
    reference = train_args(
        token_folder, tmp_path / "ref", "train.max_updates=800", "train.log_interval=1"
    )
    assert run_child(reference).returncode == 0
    last = tmp_path / "run" / "checkpoint_last.pt"
    resumed = []
    for _ in range(20):
        expected = checkpoint.load(last)["counters"]["updates"] if last.is_file() else None
        proc = subprocess.Popen(
            sbtrain_command(*args),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(2.0, 4.5))  # start-up takes ~3 s: some kills land before training
        proc.kill()
        out, _ = proc.communicate()
        if expected is not None and "resuming" in out:
            resumed.append(expected)
            assert f"at update {expected}\n" in out.replace(" |", "\n")  # the latest checkpoint
    assert len(resumed) >= 8 and resumed == sorted(resumed) and resumed[-1] > resumed[0]
    before = checkpoint.load(last)["counters"]["updates"]  # a whole checkpoint after every kill
    final = run_child(args)
    assert final.returncode == 0 and f"at update {before}" in final.stdout
    assert not list((tmp_path / "run").glob(f"{checkpoint.TEMP_PREFIX}*"))
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_ddp_two_processes_match_one_process(token_folder, tmp_path):
    common = [
        "train.max_updates=20",
        "train.log_interval=1",
        "model.dropout=0.0",
        "train.max_epochs=1",
    ]
    one = run_child(train_args(token_folder, tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    torchrun = TORCHRUN
    two = subprocess.run(
        [*torchrun, *train_args(token_folder, tmp_path / "two", *common)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [u for u, _ in a] == [u for u, _ in b] == list(range(1, 21))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)
    assert two.stdout.count("| model:") == 1  # only rank 0 prints


def test_fp16_overflow_is_skipped_and_counted_and_runs_end_finite(token_folder, tmp_path):
    for precision in ("fp16", "bf16"):
        save = tmp_path / precision
        overrides = [
            f"train.precision={precision}",
            "train.max_updates=12",
            "train.log_interval=1",
            "train.tensorboard=true",
            "train.loss_scale_init=1.0e12",
        ]
        assert main(train_args(token_folder, save, *overrides)) == 0
        records = read_jsonl(save / "train.jsonl")
        assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["update"] == 12
        if precision == "fp16":
            skipped = read_jsonl(save / "overflow.jsonl")
            assert len(skipped) >= 1 and records[-1]["skipped"] == len(skipped)
            assert records[-1]["loss_scale"] < 1.0e12


def test_tensorboard_holds_the_metric_tags(token_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["train.max_updates=10", "train.log_interval=2", "train.tensorboard=true"]
    assert main(train_args(token_folder, tmp_path, *overrides)) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "ppl", "wps", "ups", "wpb", "bsz", "gnorm", "lr", "clip", "wall"):
        assert f"train/{name}" in tags
    assert "valid/loss" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_bad_inputs_get_one_line_and_status_2(token_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(train_args(token_folder, blocker / "sub", "train.max_updates=2")) == 2
    assert "cannot write there" in one_error_line(capsys)

    assert main(train_args(tmp_path / "nowhere", tmp_path / "x")) == 2
    assert "not a preprocessed data folder" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()  # nothing written

    assert (
        main(
            train_args(
                token_folder,
                tmp_path / "y",
                "data.tokens_per_sample=30000",
                "model.positions=sinusoidal",
            )
        )
        == 2
    )
    assert "longer than the training data" in one_error_line(capsys)

    assert main(train_args(token_folder, tmp_path / "z", "train.max_updates=2")) == 0
    capsys.readouterr()
    before = (tmp_path / "z" / "checkpoint_last.pt").read_bytes()
    assert main(train_args(token_folder, tmp_path / "z", "model.d_model=32")) == 2
    assert "model.d_model=64, the recipe has 32" in one_error_line(capsys)
    assert (tmp_path / "z" / "checkpoint_last.pt").read_bytes() == before  # nothing destroyed

    assert main(train_args(token_folder, tmp_path / "w", "train.micro_batch_size=3")) == 2
    assert "train.micro_batch_size" in one_error_line(capsys)


def test_batch_that_cannot_be_split_over_processes(token_folder, tmp_path):
    torchrun = TORCHRUN
    run = subprocess.run(
        [*torchrun, *train_args(token_folder, tmp_path, "train.batch_size=7")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "train.batch_size=7 cannot be split over 2 processes" in run.stderr


def test_finetune_from_a_checkpoint_with_reset_flags(token_folder, tmp_path):
    assert main(train_args(token_folder, tmp_path / "pre", "train.max_updates=30")) == 0
    args = train_args(token_folder, tmp_path / "ft", "train.max_updates=5", "train.log_interval=1")
    restore = [
        "--restore-file",
        str(tmp_path / "pre" / "checkpoint_last.pt"),
        "--reset-optimizer",
        "--reset-dataloader",
    ]
    assert main([*args, *restore]) == 0
    first = read_jsonl(tmp_path / "ft" / "train.jsonl")[0]
    assert first["update"] == 1  # counters reset
    pretrained = read_jsonl(tmp_path / "pre" / "train.jsonl")[-1]["loss"]
    assert first["loss"] < pretrained * 1.5  # starts from the trained weights, not from scratch
    assert torch.isfinite(torch.tensor(first["loss"]))
