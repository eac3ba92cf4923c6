"""More than one process (torchrun, gloo, CPU): FSDP2 matches one process for a language model, a
classifier and the copy task; sharded checkpoints resume with another number of processes and
are read by eval-ppl, generate and export; context parallelism (alone and with data parallelism)
matches one process, dropout on; what cannot work is refused in one line."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from sbtrain import checkpoint, evaluate
from tests.conftest import DEBUG_RECIPE, ROOT, one_error_line, read_jsonl, subprocess_env

pytestmark = pytest.mark.slow
LISTOPS = ROOT / "recipes" / "lra" / "listops-cpu.yaml"
COPY = ROOT / "recipes" / "copy-demo.yaml"
TINY_COPY = ["copy.length=15", "copy.n_symbols=8", "copy.train_size=256", "copy.valid_size=16",
             "copy.test_size=16", "train.batch_size=16"]  # fmt: skip
TINY_LISTOPS = ["listops.train=256", "listops.valid=32", "listops.test=32", "listops.min_tokens=8",
                "listops.max_tokens=32", "listops.max_depth=3", "data.tokens_per_sample=32",
                "train.batch_size=16"]  # fmt: skip
COMMON = ["train.tensorboard=false", "train.log_interval=1", "model.dropout=0.0",
          "model.d_model=32", "model.d_ff=64", "model.n_heads=2"]  # fmt: skip


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "sbtrain", *map(str, args)]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    return result


def train(processes: int, recipe, save, *overrides) -> list[tuple[int, float]]:
    args = ["train", recipe, f"train.save_dir={save}", *COMMON, *overrides]
    if processes == 1:
        result = subprocess.run([sys.executable, "-m", "sbtrain", *map(str, args)],
                                env=subprocess_env(), capture_output=True, text=True)  # fmt: skip
    else:
        result = torchrun(processes, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [(r["update"], r["loss"]) for r in read_jsonl(save / "train.jsonl")]


def close(a: list, b: list, tolerance: float = 1e-5) -> bool:
    return [u for u, _ in a] == [u for u, _ in b] and all(
        abs(x - y) <= tolerance * abs(y) for (_, x), (_, y) in zip(a, b)
    )


@pytest.fixture(scope="module")
def listops_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("listops") / "bin"
    assert main(["preprocess", str(LISTOPS), *TINY_LISTOPS, f"data.dir={data}"]) == 0
    return data


def cases(token_folder, listops_data):
    return {
        "lm": (DEBUG_RECIPE, [f"data.dir={token_folder}"]),
        "classifier": (LISTOPS, [*TINY_LISTOPS, f"data.dir={listops_data}"]),
        "copy": (COPY, TINY_COPY),
    }


@pytest.mark.parametrize("task", ["lm", "classifier", "copy"])
def test_fsdp_matches_one_process(task, token_folder, listops_data, tmp_path):
    recipe, overrides = cases(token_folder, listops_data)[task]
    overrides = [*overrides, "train.max_updates=12"]
    one = train(1, recipe, tmp_path / "one", *overrides)
    assert len(one) == 12
    for processes in (2, 4):
        sharded = train(processes, recipe, tmp_path / f"fsdp{processes}", *overrides,
                        "train.parallel=fsdp")  # fmt: skip
        assert close(sharded, one), (processes, sharded, one)


def test_fsdp_with_accumulation_checkpointing_and_bf16(token_folder, tmp_path):
    args = [f"data.dir={token_folder}", "train.max_updates=6", "train.micro_batch_size=2",
            "train.activation_checkpointing=true"]  # fmt: skip
    one = train(1, DEBUG_RECIPE, tmp_path / "one", *args)
    assert close(train(2, DEBUG_RECIPE, tmp_path / "f", *args, "train.parallel=fsdp"), one)
    bf16 = train(2, DEBUG_RECIPE, tmp_path / "bf16", *args, "train.parallel=fsdp",
                 "train.precision=bf16")  # fmt: skip
    assert close(bf16, one, tolerance=2e-2)  # bf16 compute: close, not equal


def test_sharded_checkpoints_resume_with_other_process_counts(token_folder, tmp_path):
    args = [DEBUG_RECIPE, f"data.dir={token_folder}", "train.parallel=fsdp"]
    straight = train(2, *args[:1], tmp_path / "straight", *args[1:], "train.max_updates=10")
    train(2, *args[:1], tmp_path / "saved", *args[1:], "train.max_updates=5")
    last = tmp_path / "saved" / "checkpoint_last.pt"
    assert last.is_symlink() and last.is_dir()
    assert sorted(p.name for p in last.iterdir())[-2:] == ["__1_0.distcp", "state.pt"]
    for processes in (1, 2, 4):
        run = tmp_path / f"resumed{processes}"
        shutil.copytree(tmp_path / "saved", run, symlinks=True)
        resumed = train(processes, *args[:1], run, *args[1:], "train.max_updates=10")
        assert [u for u, _ in resumed] == list(range(1, 11))
        tolerance = 0 if processes == 2 else 1e-6  # bit for bit; else the sums' order differs
        assert close(resumed, straight, tolerance), (processes, resumed, straight)


def test_a_single_file_checkpoint_continues_under_fsdp(token_folder, tmp_path):
    """A run saved by DDP (one file) continues under FSDP (its tensors cut into shards as they
    load, the AdamW moments too): the losses follow a run that never stopped."""
    args = [DEBUG_RECIPE, f"data.dir={token_folder}"]
    straight = train(2, *args[:1], tmp_path / "straight", *args[1:], "train.max_updates=6")
    run = tmp_path / "run"
    train(2, *args[:1], run, *args[1:], "train.max_updates=3")
    assert (run / "checkpoint_last.pt").is_file()
    resumed = train(2, *args[:1], run, *args[1:], "train.max_updates=6", "train.parallel=fsdp")
    assert close(resumed, straight, 1e-6), (resumed, straight)


def test_a_sharded_checkpoint_is_read_by_eval_generate_and_export(token_folder, tmp_path, capsys):
    train(1, DEBUG_RECIPE, tmp_path / "plain", f"data.dir={token_folder}", "train.max_updates=4")
    train(2, DEBUG_RECIPE, tmp_path / "fsdp", f"data.dir={token_folder}", "train.max_updates=4",
          "train.parallel=fsdp")  # fmt: skip
    scores = [evaluate.main(tmp_path / run / "checkpoint_best.pt", split="valid",
                            data_dir=str(token_folder), device="cpu", progress=False)
              for run in ("plain", "fsdp")]  # fmt: skip
    assert scores[1]["loss_nats"] == pytest.approx(scores[0]["loss_nats"], rel=1e-5)
    ckpt = str(tmp_path / "fsdp" / "checkpoint_best.pt")
    assert main(["eval-ppl", ckpt, "--data", str(token_folder), "--split", "valid",
                 "--attention", "performer", "n_features=16"]) == 0  # fmt: skip
    train(2, COPY, tmp_path / "copy", *TINY_COPY, "train.max_updates=2", "train.parallel=fsdp")
    copy = str(tmp_path / "copy" / "checkpoint_best.pt")
    assert main(["generate", copy, "--prompt", "0 3 1", "--max-tokens", "2"]) == 0
    pytest.importorskip("safetensors")
    assert main(["export", ckpt, str(tmp_path / "hf"), "--no-tokenizer"]) == 0


def test_torn_and_foreign_shard_folders_are_one_line(token_folder, tmp_path, capsys):
    train(2, DEBUG_RECIPE, tmp_path / "run", f"data.dir={token_folder}", "train.max_updates=2",
          "train.parallel=fsdp")  # fmt: skip
    folder = (tmp_path / "run" / "checkpoint_last.pt").resolve()
    (folder / "__1_0.distcp").write_bytes(b"cut")
    assert main(["eval-ppl", str(folder), "--data", str(token_folder)]) == 2
    assert "its shards cannot be read" in one_error_line(capsys)
    (folder / ".metadata").unlink()
    assert main(["eval-ppl", str(folder), "--data", str(token_folder)]) == 2
    assert "not a complete sharded checkpoint" in one_error_line(capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert main(["eval-ppl", str(foreign)]) == 2
    assert "not a complete sharded checkpoint" in one_error_line(capsys)
    # a .metadata other than the one saved with state.pt is never unpickled (DCP would)
    planted = tmp_path / "planted"
    shutil.copytree(folder, planted)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (planted / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert main(["eval-ppl", str(planted), "--data", str(token_folder)]) == 2
    assert "is not the one sbtrain wrote" in one_error_line(capsys) and not marker.exists()


def test_a_save_cut_short_leaves_the_last_checkpoint_and_is_cleared(token_folder, tmp_path):
    run = tmp_path / "run"
    args = [f"data.dir={token_folder}", "train.parallel=fsdp"]
    train(2, DEBUG_RECIPE, run, *args, "train.max_updates=3")
    good = (run / "checkpoint_last.pt").resolve()
    partial = run / ".sharded-000000004-deadbeef"  # a save killed before its state and names
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.load(run / "checkpoint_last.pt")["counters"]["updates"] == 3
    resumed = train(2, DEBUG_RECIPE, run, *args, "train.max_updates=5")
    assert [u for u, _ in resumed] == [1, 2, 3, 4, 5]
    assert not partial.exists() and not good.exists()  # cleared by the next save, superseded


@pytest.mark.parametrize("processes, parts", [(2, 2), (4, 4), (4, 2)])
def test_context_parallel_matches_one_process_with_dropout(token_folder, tmp_path, processes,
                                                          parts):  # fmt: skip
    kinds = "{kind: scatterbrain, sparse: local, window: 8, n_features: 16}"
    args = [f"data.dir={token_folder}", "train.max_updates=6", f"model.attention={kinds}",
            "model.positions=rope"]  # fmt: skip
    dropout = [*args, "model.dropout=0.1"]
    one = train(1, DEBUG_RECIPE, tmp_path / "one", *dropout)
    split = train(processes, DEBUG_RECIPE, tmp_path / "cp", *dropout,
                  f"train.context_parallel={parts}")  # fmt: skip
    if processes == parts:  # the same masks: every chunk of every sequence as one process
        assert close(split, one, tolerance=1e-5), (split, one)
    else:  # two groups share the batch: dropout draws per group, as DDP does
        one = train(1, DEBUG_RECIPE, tmp_path / "one-nodrop", *args)
        split = train(processes, DEBUG_RECIPE, tmp_path / "cp-nodrop", *args,
                      f"train.context_parallel={parts}")  # fmt: skip
        assert close(split, one), (split, one)


def test_context_parallel_resumes_exactly(token_folder, tmp_path):
    args = [f"data.dir={token_folder}", "train.context_parallel=2", "model.dropout=0.1",
            "model.attention={kind: local, window: 8}"]  # fmt: skip
    straight = train(2, DEBUG_RECIPE, tmp_path / "straight", *args, "train.max_updates=6")
    train(2, DEBUG_RECIPE, tmp_path / "run", *args, "train.max_updates=3")
    resumed = train(2, DEBUG_RECIPE, tmp_path / "run", *args, "train.max_updates=6")
    assert resumed == straight


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.attention={kind: lsh, bucket_size: 8}"], "lsh cannot be split"),
        (["model.attention={kind: scatterbrain, sparse: lsh, n_features: 8}"], "sparse=lsh"),
        (["train.context_parallel=3"], "3 does not divide the 64 positions"),
        (["model.attention={kind: local, window: 48}"], "shorter than the window of 48"),
    ],
)
def test_what_context_parallelism_cannot_split_is_refused(token_folder, capsys, overrides,
                                                         message):  # fmt: skip
    args = ["train", str(DEBUG_RECIPE), f"data.dir={token_folder}", "train.context_parallel=2",
            *overrides]  # fmt: skip
    assert main(args) == 2
    assert message in one_error_line(capsys)


def test_context_parallelism_refuses_a_classifier(capsys):
    assert main(["train", str(LISTOPS), "train.context_parallel=2"]) == 2
    assert "scores whole ones" in one_error_line(capsys)
