"""The memory allocator of sbtrain's processes on CPU: a caching allocator preloaded by
re-executing the command (LD_PRELOAD), the way PyTorch's own CPU launcher sets one up.

A long CPU training step frees and reallocates the same large blocks in every layer; glibc maps
large blocks afresh and unmaps them when freed, so each pass page-faults its tensors in again
(half of a 32k-token step's time, benchmarks/README.md). A caching allocator that keeps freed pages
avoids that. `SBTRAIN_ALLOCATOR` picks one (ALLOCATORS; default: `default()`); `glibc` keeps the
C library's malloc with sbtrain's earlier tuning (sbtrain.distributed.keep_freed_cpu_memory).
Where the chosen library is not installed, one line says what to install and glibc serves.

    SBTRAIN_ALLOCATOR=glibc sbtrain train recipes/wt103.yaml    # compare with the default
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

from sbtrain.errors import UserError

ENV, ACTIVE = "SBTRAIN_ALLOCATOR", "SBTRAIN_ALLOCATOR_ACTIVE"
SYSTEM_LIBS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


class Allocator(NamedTuple):
    files: tuple[str, ...]  # the library, first found wins (a wheel's, then the system's)
    settings: dict  # environment the library reads
    install: str  # what to install where it is missing


def wheel_lib(name: str) -> str:
    """A library a cmeel wheel installs into site-packages."""
    return str(Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / name)


ALLOCATORS = {
    "jemalloc": Allocator(
        ("libjemalloc.so.2",), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
        "the Debian/Ubuntu package libjemalloc2",
    ),
    "jemalloc-default": Allocator(
        ("libjemalloc.so.2",), {}, "the Debian/Ubuntu package libjemalloc2"
    ),
    "tcmalloc": Allocator(
        ("libtcmalloc_minimal.so.4",), {"TCMALLOC_RELEASE_RATE": "0"},
        "the Debian/Ubuntu package libtcmalloc-minimal4",
    ),
    "tcmalloc-default": Allocator(
        ("libtcmalloc_minimal.so.4",), {}, "the Debian/Ubuntu package libtcmalloc-minimal4"
    ),
    "mimalloc": Allocator(
        (wheel_lib("libmimalloc.so"), "libmimalloc.so.2"), {"MIMALLOC_PURGE_DELAY": "-1"},
        "pip install cmeel-mimalloc",
    ),
    "mimalloc-default": Allocator(
        (wheel_lib("libmimalloc.so"), "libmimalloc.so.2"), {}, "pip install cmeel-mimalloc"
    ),
}  # fmt: skip
# The default: the first of these installed. Measured side by side on a 4-layer slice of the
# wt103 scatterbrain model (benchmarks/README.md, CPU allocator): tcmalloc (the system package
# libtcmalloc-minimal4) makes a step 1.8-1.9x faster at 8k-32k tokens for at most 1.16x glibc's
# peak memory; mimalloc, which a wheel brings (a dependency on Linux), 1.5-1.6x for at most 1.5x;
# jemalloc keeping its pages 1.7x for at most 1.45x; jemalloc's defaults gain almost nothing.
# tcmalloc keeps its pages (release rate 0): at its default rate it handed pages back after some
# steps and grew 0.5 GiB when it took them again; kept, memory is flat from the second step (the
# whole model: 1.65-1.66x faster than glibc for 1.07-1.46x its peak).
PREFERENCE = ("tcmalloc", "mimalloc")
GLIBC = "glibc"


def default() -> str:
    """The allocator a process gets without SBTRAIN_ALLOCATOR: the first of PREFERENCE
    installed (else the first, which then says what to install)."""
    return next((name for name in PREFERENCE if find(ALLOCATORS[name])), PREFERENCE[0])


def active() -> str:
    """The allocator this process was started with (what `preload` set)."""
    return os.environ.get(ACTIVE, GLIBC)


def loaded() -> str:
    """The allocator whose library this process has mapped (read from /proc/self/maps), or
    glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return active()
    name = active()
    library = find(ALLOCATORS[name]) if name in ALLOCATORS else None
    return name if library and str(Path(library).resolve()) in maps else GLIBC


def find(allocator: Allocator) -> str | None:
    for name in allocator.files:
        candidates = [Path(name)] if "/" in name else [Path(d) / name for d in SYSTEM_LIBS]
        for path in candidates:
            if path.is_file():
                return str(path)
    return None


def preload(argv: list[str]) -> None:
    """Re-execute `python -m sbtrain ARGV` with the chosen allocator preloaded (once: the new
    process finds it active); return where glibc is chosen, already active, or not installed."""
    chosen = os.environ.get(ENV) or default()
    if chosen != GLIBC and chosen not in ALLOCATORS:
        names = " | ".join([GLIBC, *ALLOCATORS])
        raise UserError(f"{ENV}={chosen}: unknown allocator (choose {names})")
    if chosen == GLIBC or ACTIVE in os.environ or not sys.platform.startswith("linux"):
        return  # (LD_PRELOAD is how Linux loads it; elsewhere the system's malloc serves)
    allocator = ALLOCATORS[chosen]
    library = find(allocator)
    if library is None:
        print(
            f"sbtrain: the {chosen} allocator is not installed (install {allocator.install} for "
            f"faster CPU steps, or set {ENV}={GLIBC}); using glibc's malloc",
            file=sys.stderr,
        )
        os.environ[ACTIVE] = GLIBC  # said once: the processes it starts stay quiet
        return
    env = {**allocator.settings, **os.environ, ACTIVE: chosen}  # the user's settings win
    env["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, "-m", "sbtrain", *argv], env)
