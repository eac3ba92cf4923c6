"""Process-wide settings of sbtrain.distributed."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from sbtrain.distributed import pick_device
if sys.argv[1] == "cpu":
    pick_device("cpu")
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = resident_mib()
if sys.argv[2] == "small":  # 64 blocks of 3 MiB, each under the 4 MiB threshold
    blocks = [torch.ones(3 * 2**18) for _ in range(64)]
else:  # one 256 MiB block, far over it (and over glibc's largest default mmap threshold)
    blocks = [torch.ones(64 * 2**20)]
del blocks
print(resident_mib() - before)
"""


def _resident_growth(device_picked: str, blocks: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, device_picked, blocks],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_cpu_device_keeps_small_freed_blocks_and_returns_large_ones():
    # glibc's default trims a freed heap top over its (dynamic) trim threshold; after
    # pick_device("cpu") the 192 MiB of small blocks stay resident for the next step
    assert _resident_growth("none", "small") < 16
    assert _resident_growth("cpu", "small") > 180
    # a freed 256 MiB block is unmapped, so large temporaries cannot fragment the heap
    assert _resident_growth("cpu", "large") < 16
