"""Faults of the disk: a write that fails (no space, a file-size limit, read-only, I/O error, a
vanished folder) in preprocess, checkpoint saves, export and result files gets one line naming
the path, exit status 2, no partial file; the last good checkpoint or data folder stays intact,
and training resumes exactly once space is back. A data file cut short is refused.

The failing writes are real: each command runs in a child process whose file-size limit
(RLIMIT_FSIZE, SIGXFSZ ignored) makes the write past it fail with EFBIG, or on a tmpfs of a few
kilobytes (ENOSPC) or mounted read-only (EROFS) where the machine lets a test mount one."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from cli.main import main
from sbtrain import checkpoint
from sbtrain.errors import UserError
from tests.conftest import (
    DEBUG_RECIPE,
    one_error_line,
    read_jsonl,
    sbtrain_command,
    subprocess_env,
)


def limited(max_bytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def run(*args: str, max_bytes: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        sbtrain_command(*map(str, args)), env=subprocess_env(), capture_output=True, text=True,
        preexec_fn=limited(max_bytes) if max_bytes else None, timeout=300,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, (
        result.stderr[-2000:]
    )
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or staging files a failed write could leave behind."""
    return sorted(p.name for p in Path(folder).rglob("*") if ".tmp" in p.name or ".part" in p.name)


def train_args(data, save, *extra):
    return ["train", str(DEBUG_RECIPE), f"data.dir={data}", f"train.save_dir={save}",
            "train.tensorboard=false", "train.log_interval=1", *extra]  # fmt: skip


def test_a_checkpoint_save_that_fails_stops_the_run_and_it_resumes_exactly(token_folder, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(*train_args(token_folder, straight, "train.max_updates=8")).returncode == 0
    assert run(*train_args(token_folder, stopped, "train.max_updates=4")).returncode == 0
    last = stopped / "checkpoint_last.pt"
    size, good = last.stat().st_size, last.read_bytes()
    failed = run(*train_args(token_folder, stopped, "train.max_updates=8"), max_bytes=size // 2)
    line = one_line(failed)
    assert (
        str(last) in line and os.strerror(errno.EFBIG) in line and "rerun the same command" in line
    )
    assert last.read_bytes() == good and leftovers(stopped) == []  # the last good one, whole
    assert checkpoint.load(last)["counters"]["updates"] == 4
    assert run(*train_args(token_folder, stopped, "train.max_updates=8")).returncode == 0
    expected = [(r["update"], r["loss"]) for r in read_jsonl(straight / "train.jsonl")]
    assert [(r["update"], r["loss"]) for r in read_jsonl(stopped / "train.jsonl")] == expected


def test_preprocess_that_cannot_write_leaves_no_folder_and_an_old_one_intact(word_corpus,
                                                                            tmp_path):  # fmt: skip
    raw, data = word_corpus
    out = tmp_path / "bin"
    args = ["preprocess", DEBUG_RECIPE, f"data.raw={raw}", f"data.dir={out}"]
    line = one_line(run(*args, max_bytes=2000))
    assert str(out) in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    shutil.copytree(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_line(run(*args, "--force", max_bytes=2000))
    assert "it is as it was" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_export_that_cannot_write_leaves_an_old_folder_intact(trained_debug, tmp_path):
    pytest.importorskip("safetensors")  # the hf extra: `make test` installs it
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    ckpt = trained_debug / "checkpoint_best.pt"
    line = one_line(run("export", ckpt, out, "--force", "--no-tokenizer", max_bytes=20_000))
    assert str(out) in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_result_files_are_written_whole_or_not_at_all(trained_debug, token_folder, tmp_path):
    png = tmp_path / "by-position.png"
    args = ["eval-ppl", trained_debug / "checkpoint_best.pt", "--data", token_folder,
            "--split", "valid", "--by-position", "16", "--plot", png]  # fmt: skip
    line = one_line(run(*args, max_bytes=2000))
    assert str(png) in line and not png.exists() and leftovers(tmp_path) == []
    out = tmp_path / "approx.json"
    bench = ["bench", "approx", "--budget", "8", "--length", "32", "--heads", "1", "--head-dim",
             "8", "--seeds", "1", "--out", out]  # fmt: skip
    line = one_line(run(*bench, max_bytes=600))
    assert str(out) in line and not out.exists() and leftovers(tmp_path) == []


class FailingFile:
    """A real file whose write fails with EIO once `budget` bytes have been written."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_an_io_error_mid_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    checkpoint.save({"model": {"w": torch.zeros(10)}}, path)
    good = path.read_bytes()
    failing = lambda p, m: FailingFile(open(p, m), 300)  # noqa: E731, SIM115
    monkeypatch.setattr(checkpoint, "open", failing, raising=False)
    with pytest.raises(UserError, match=f"{path}: {os.strerror(errno.EIO)} while writing"):
        checkpoint.save({"model": {"w": torch.ones(10_000)}}, path)
    assert path.read_bytes() == good and leftovers(tmp_path) == []


def test_a_vanished_folder_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(UserError, match=f"{gone}.*No such file or directory"):
        checkpoint.save({"model": {}}, gone / "checkpoint_last.pt")


def test_a_data_file_cut_short_or_unlike_its_record_is_refused(token_folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(token_folder, data)
    (data / "train.json").write_text(json.dumps({"tokens": 20_000}))
    (data / "valid.bin").write_bytes((data / "valid.bin").read_bytes()[:-3])  # 1.5 tokens less
    assert main(train_args(data, tmp_path / "run", "train.max_updates=2")) == 2
    line = one_error_line(capsys)
    assert "valid.bin is cut short" in line and "preprocess --force" in line
    (data / "valid.bin").write_bytes((token_folder / "valid.bin").read_bytes())
    (data / "train.json").write_text(json.dumps({"tokens": 19_000}))
    assert main(train_args(data, tmp_path / "run", "train.max_updates=2")) == 2
    line = one_error_line(capsys)
    assert "train.bin holds 20000 tokens" in line and "says 19000" in line
    assert "preprocess --force" in line


@pytest.fixture
def tmpfs(tmp_path):
    """A 600 KB tmpfs at tmp_path/fs (skipped where the test may not mount one)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    tag = f"sbtrain-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", tag, str(mount)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip("this machine does not let the test mount a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_no_space_and_read_only_on_a_real_tmpfs(token_folder, word_corpus, tmpfs):
    raw, _ = word_corpus
    big = tmpfs / "filler"
    big.write_bytes(b"x" * 590_000)  # leaves ~10 KB
    out = tmpfs / "bin"
    line = one_line(run("preprocess", DEBUG_RECIPE, f"data.raw={raw}", f"data.dir={out}"))
    assert os.strerror(errno.ENOSPC) in line and not out.exists() and leftovers(tmpfs) == []
    save = tmpfs / "run"  # a checkpoint (~1.3 MB) does not fit: the first save fails
    big.unlink()
    line = one_line(run(*train_args(token_folder, save, "train.max_updates=2")))
    assert os.strerror(errno.ENOSPC) in line and leftovers(tmpfs) == []
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    line = one_line(run("preprocess", DEBUG_RECIPE, f"data.raw={raw}", f"data.dir={out}"))
    assert os.strerror(errno.EROFS) in line
