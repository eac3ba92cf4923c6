"""Safe output folders and the plumbing every writer shares: a folder is written beside its
target and renamed into place only once complete, SIGTERM unwinds like an exception (so the
half-written folder is removed), worker pools are spawned, JSON files are written whole.

    check_target(target, inputs, force)       # refuse before any work is done
    with sigterm_as_exit(), staging(target, force) as folder, worker_map(4) as imap:
        ...write files into folder...          # replaces target when the block completes
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sbtrain.errors import UserError

Imap = Callable[[Callable, list], Iterator]


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143), so `finally` blocks (staging cleanup) run on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_target(target: Path, inputs: Mapping[str, Path], force: bool) -> None:
    """Refuse an output folder we must not replace; checked before any work is done.

    `inputs` (name -> path) may not lie inside it; --force replaces only a folder that
    `sbtrain preprocess` wrote (or an empty one).
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; choose another data.dir")
    if not force:
        raise UserError(
            f"{target}: output folder exists; pass --force to replace it "
            "(it is replaced only once the new one is complete)"
        )
    for name, path in inputs.items():
        if target in Path(os.path.abspath(path)).parents or target == Path(os.path.abspath(path)):
            raise UserError(f"{path}: the {name} input is inside data.dir; choose another data.dir")
    if any(target.iterdir()) and not is_output(target):
        raise UserError(
            f"{target}: --force only replaces a folder written by sbtrain preprocess "
            "(this one has no sbtrain meta.json); remove it yourself if you mean it"
        )


def is_output(folder: Path) -> bool:
    """Whether `folder` was written by sbtrain preprocess (any of its data formats)."""
    try:
        found = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(found, str) and found.startswith("sbtrain-")


class _Recorded:
    """A file whose failed write is kept: torch.save reports one as a RuntimeError without the
    system's reason ("unexpected pos"), which `error` holds."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, f) -> None:
    """torch.save `obj` into the open binary file `f`; a failed write raises its OSError (no
    space, I/O error), which disk_error turns into one line."""
    import torch  # only the writers of tensors need it

    recorded = _Recorded(f)
    try:
        torch.save(obj, recorded)
    except RuntimeError:
        if recorded.error is None:
            raise  # not a failed write
        raise recorded.error from None


def disk_error(error: OSError, target: Path | str, advice: str) -> UserError:
    """One line for a failed write (no space, a read-only or vanished folder, an I/O error):
    the path, the system's reason, and what to do."""
    where = error.filename or target
    return UserError(f"{where}: {error.strerror or error} while writing {target}; {advice}")


@contextmanager
def staging(target: Path, force: bool) -> Iterator[Path]:
    """A new folder beside `target` that takes its place once the block completes; on any
    error or interrupt it is removed and `target` is left as it was. A failed write (no space,
    read-only, I/O error) becomes a UserError naming the path."""
    folder = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()  # the usual permissions (a tempfile folder would be private)
        yield folder
        replace_folder(folder, target, force)
    except OSError as e:
        kept = "it is as it was" if target.exists() else "nothing was written"
        advice = f"free space or choose a writable folder and run again ({target}: {kept})"
        raise disk_error(e, target, advice) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already when the rename succeeded


def replace_folder(new: Path, target: Path, force: bool = True) -> None:
    """Rename `new` to `target`; an existing `target` (only with `force`) is moved aside first
    and removed after, or put back if the rename fails."""
    if not target.exists():
        os.rename(new, target)
        return
    if not force:
        raise UserError(f"{target}: appeared while writing; pass --force to replace it")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)  # folders cannot be swapped atomically: move the old one aside
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextmanager
def worker_map(workers: int) -> Iterator[Imap]:
    """An ordered `imap` over `workers` spawned processes (plain `map` for one worker).

    Spawned workers import the caller's main module: call from under `if __name__ == "__main__":`.
    """
    if workers == 1:
        yield map
        return
    # spawn, not fork: a forked child would inherit the tokenizer libraries' thread pools
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=ignore_sigint) as pool:
        yield pool.imap


def ignore_sigint() -> None:
    """Ctrl-C reaches the whole process group: the parent alone handles it (and stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def write_json(path: Path, obj: object, indent: int = 2) -> None:
    """`obj` as indented JSON with a final newline, written whole (see `write_file`)."""
    write_file(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))


def write_file(path: str | Path, write: Callable[[object], object]) -> None:
    """`write(f)` into a temporary file beside `path`, renamed to `path` once complete: a reader
    sees the old file or the whole new one, and a failed write (no space, read-only, I/O error)
    leaves no partial file and raises a UserError naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(
            e, path, "free space or choose a writable folder, then run again"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path: str | Path, **options) -> None:
    """A matplotlib figure saved as `write_file` writes (PNG, from the name)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_file(path, lambda f: fig.savefig(f, format=fmt, **options))
