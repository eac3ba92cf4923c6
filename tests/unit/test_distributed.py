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
block = torch.ones(64 * 2**20)  # 256 MiB, far over glibc's largest default mmap threshold
del block
print(resident_mib() - before)
"""


def _resident_growth(device_picked: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, device_picked], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_cpu_device_keeps_freed_memory_for_the_next_step():
    # glibc's default unmaps a 256 MiB block when it is freed; after pick_device("cpu") it stays
    # resident for reuse, as the CUDA caching allocator keeps its blocks
    assert _resident_growth("none") < 16
    assert _resident_growth("cpu") > 240
