"""Atomic checkpoints, and refusing files that are not ours."""

from __future__ import annotations

import os

import pytest
import torch

from sbtrain import checkpoint
from sbtrain.errors import UserError


def test_save_writes_all_names_and_leaves_no_temp_file(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "counters": {"updates": 3}}
    checkpoint.save(state, tmp_path / "checkpoint_last.pt", [tmp_path / "checkpoint_best.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_best.pt",
        "checkpoint_last.pt",
    ]
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        loaded = checkpoint.load(tmp_path / name)
        assert (
            torch.equal(loaded["model"]["w"], state["model"]["w"])
            and loaded["counters"]["updates"] == 3
        )


def test_a_later_save_keeps_the_earlier_best_and_removes_stale_temps(tmp_path):
    checkpoint.save({"v": 1}, tmp_path / "checkpoint_last.pt", [tmp_path / "checkpoint_best.pt"])
    (tmp_path / f"{checkpoint.TEMP_PREFIX}checkpoint_last.pt.999").write_bytes(b"half a file")
    checkpoint.save({"v": 2}, tmp_path / "checkpoint_last.pt")
    assert checkpoint.load(tmp_path / "checkpoint_best.pt")["v"] == 1
    assert checkpoint.load(tmp_path / "checkpoint_last.pt")["v"] == 2
    assert not list(tmp_path.glob(f"{checkpoint.TEMP_PREFIX}*"))


def test_prune_keeps_the_newest_numbered_checkpoints(tmp_path):
    for epoch, updates in [(1, 10), (2, 20), (3, 30), (4, 40)]:
        checkpoint.save({}, tmp_path / f"checkpoint_{epoch}_{updates}.pt")
    checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.numbered(tmp_path)] == [
        "checkpoint_3_30.pt",
        "checkpoint_4_40.pt",
    ]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = str(tmp_path / "code-ran")
    torch.save({"format": checkpoint.FORMAT, "model": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="could run code"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not os.path.exists(marker)


def test_truncated_foreign_and_missing_files_are_refused(tmp_path):
    checkpoint.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="not an sbtrain checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "text.pt")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "absent.pt")


def test_a_dangling_last_link_is_refused_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint_last.pt").symlink_to(tmp_path / ".checkpoint-gone")
    with pytest.raises(UserError, match=r"checkpoint_last\.pt: a link to .*, which is gone"):
        checkpoint.resume_point(tmp_path, None)


def test_a_failed_sharded_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from sbtrain import sharded

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"counters": {"updates": 1}}
    sharded.save(state, model, optimizer, tmp_path, ["checkpoint_last.pt"], main=True)
    good = (tmp_path / "checkpoint_last.pt").resolve()
    full = OSError(errno.ENOSPC, "No space left on device", "shard.distcp")

    def fails(*args, **kwargs):  # as DCP reports a process's failed write
        raise CheckpointException("save", {0: (full, None)})

    monkeypatch.setattr(sharded.dcp, "save", fails)
    state["counters"]["updates"] = 2
    with pytest.raises(UserError, match=r"shard\.distcp: No space left on device while writing"):
        sharded.save(state, model, optimizer, tmp_path, ["checkpoint_last.pt"], main=True)
    assert (tmp_path / "checkpoint_last.pt").resolve() == good and good.is_dir()
    assert [p.name for p in tmp_path.glob(f"{sharded.PREFIX}*")] == [good.name]
