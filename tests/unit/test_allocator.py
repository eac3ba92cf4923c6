"""The CPU allocator: the command re-executes itself with it preloaded (LD_PRELOAD and its
settings), the default is the first installed of the preference, SBTRAIN_ALLOCATOR=glibc keeps
the C library's, a missing library is one line and glibc, and the losses are the same bit for
bit whichever allocates the memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sbtrain import allocator
from sbtrain.errors import UserError
from tests.conftest import DEBUG_RECIPE, read_jsonl, sbtrain_command, subprocess_env


class Executed(Exception):
    pass


@pytest.fixture
def no_exec(monkeypatch):
    """os.execve replaced by one that records its arguments and stops."""

    def execve(path, args, env):
        raise Executed(path, args, env)

    monkeypatch.setattr(os, "execve", execve)
    for name in (allocator.ENV, allocator.ACTIVE, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.pop(allocator.ACTIVE, None)  # preload sets it itself (when it tells of no library)


def test_the_command_reexecutes_with_the_library_and_its_settings(no_exec, monkeypatch, tmp_path):
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    fake = allocator.Allocator((str(library),), {"MALLOC_CONF": "x:1"}, "it")
    monkeypatch.setitem(allocator.ALLOCATORS, "jemalloc", fake)
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    with pytest.raises(Executed) as e:
        allocator.preload(["train", "r.yaml"])
    path, args, env = e.value.args
    assert path == sys.executable and args == [sys.executable, "-m", "sbtrain", "train", "r.yaml"]
    assert env["LD_PRELOAD"] == f"{library} /other.so" and env["MALLOC_CONF"] == "x:1"
    assert env[allocator.ACTIVE] == "jemalloc"
    monkeypatch.setenv("MALLOC_CONF", "y:2")  # a user's own setting of the library wins
    with pytest.raises(Executed) as e:
        allocator.preload(["train"])
    assert e.value.args[2]["MALLOC_CONF"] == "y:2"
    monkeypatch.setenv(allocator.ACTIVE, "jemalloc")  # the re-executed process: no loop
    allocator.preload(["train"])


def test_the_default_is_the_first_installed_of_the_preference(no_exec, monkeypatch, tmp_path,
                                                              capsys):  # fmt: skip
    first, second = allocator.PREFERENCE
    present = tmp_path / "lib.so"
    present.write_bytes(b"")
    missing = allocator.Allocator(("/nowhere/lib.so",), {}, "package X")
    monkeypatch.setitem(allocator.ALLOCATORS, first, missing)
    monkeypatch.setitem(allocator.ALLOCATORS, second, allocator.Allocator((str(present),), {}, ""))
    with pytest.raises(Executed) as e:  # the first missing: the second, without a word
        allocator.preload(["train"])
    assert e.value.args[2][allocator.ACTIVE] == second and capsys.readouterr().err == ""
    monkeypatch.setitem(allocator.ALLOCATORS, first, allocator.Allocator((str(present),), {}, ""))
    with pytest.raises(Executed) as e:
        allocator.preload(["train"])
    assert e.value.args[2][allocator.ACTIVE] == first
    monkeypatch.setitem(allocator.ALLOCATORS, first, missing)
    monkeypatch.setitem(allocator.ALLOCATORS, second, missing)
    allocator.preload(["train"])  # neither: one line naming the first's package, glibc serves
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"the {first} allocator is not installed (install package X" in line
    assert os.environ[allocator.ACTIVE] == "glibc"


def test_glibc_keeps_the_process_and_a_missing_library_says_what_to_install(no_exec, monkeypatch,
                                                                          capsys):  # fmt: skip
    monkeypatch.setenv(allocator.ENV, "glibc")
    allocator.preload(["train"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    monkeypatch.setitem(allocator.ALLOCATORS, "tcmalloc",
                        allocator.Allocator(("/nowhere/libtc.so",), {}, "package X"))  # fmt: skip
    allocator.preload(["train"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tcmalloc allocator is not installed (install package X" in line
    assert "SBTRAIN_ALLOCATOR=glibc" in line and os.environ[allocator.ACTIVE] == "glibc"
    monkeypatch.setenv(allocator.ENV, "nope")
    os.environ.pop(allocator.ACTIVE)
    with pytest.raises(UserError, match="unknown allocator"):
        allocator.preload(["train"])


def version(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(sbtrain_command("--version"), env=env, capture_output=True, text=True)


def test_the_version_line_names_the_allocator_the_process_has_mapped():
    env = subprocess_env()
    default = allocator.default()
    result = version(env)
    expected = default if allocator.find(allocator.ALLOCATORS[default]) else "glibc"
    assert f"(allocator: {expected})" in result.stdout
    assert version({**env, allocator.ENV: "glibc"}).stdout.endswith("(allocator: glibc)\n")


def test_losses_are_the_same_bit_for_bit_under_every_installed_allocator(token_folder, tmp_path):
    installed = [n for n in allocator.PREFERENCE if allocator.find(allocator.ALLOCATORS[n])]
    assert "mimalloc" in installed  # the wheel is a dependency on Linux
    losses = {}
    for name in ("glibc", *installed):
        save = tmp_path / name
        args = [
            "train",
            str(DEBUG_RECIPE),
            f"data.dir={token_folder}",
            f"train.save_dir={save}",
            "train.max_updates=6",
            "train.log_interval=1",
            "train.tensorboard=false",
        ]
        env = {**subprocess_env(), allocator.ENV: name}
        result = subprocess.run(sbtrain_command(*args), env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        losses[name] = [(r["update"], r["loss"]) for r in read_jsonl(save / "train.jsonl")]
    assert len(losses["glibc"]) == 6
    assert all(losses[name] == losses["glibc"] for name in installed)
