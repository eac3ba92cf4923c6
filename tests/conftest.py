"""Shared fixtures: small corpora and preprocessed folders, built on the fly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = ROOT / "recipes" / "debug.yaml"
WIKI_LEADS = ROOT.parent / "shared" / "corpora" / "wiki-leads"

torch.set_num_threads(1)  # tests are small: threads only add noise on a shared 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_token_folder(
    folder: Path, splits: dict[str, np.ndarray], vocab_size: int, eol_id: int = 2
):
    """A preprocessed folder made directly from token arrays (for tests of training alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        ids.astype(np.uint16).tofile(folder / f"{split}.bin")
    meta = {
        "format": "sbtrain-bin-1",
        "tokenizer": "word",
        "tokenizer_file": "dict.txt",
        "vocab_size": vocab_size,
        "dtype": "uint16",
        "eol_id": eol_id,
        "pad_id": 1,
        "unk_id": 3,
        "splits": sorted(splits),
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def token_folder(tmp_path_factory) -> Path:
    """A learnable token stream (noisy counting modulo 17), train 20k tokens, valid 3k."""
    rng = np.random.default_rng(0)

    def stream(n):
        return (np.arange(n) % 17 + rng.integers(0, 2, n) + 4).astype(np.uint16)

    return write_token_folder(
        tmp_path_factory.mktemp("tokens"), {"train": stream(20_000), "valid": stream(3_000)}, 32
    )


def sbtrain_command(*args: str) -> list[str]:
    """The command line of `python -m sbtrain ARGS` (for runs that need their own process)."""
    import sys

    return [sys.executable, "-m", "sbtrain", *args]


def subprocess_env() -> dict[str, str]:
    """Environment of child runs: the repository importable, one thread (bitwise repeatable)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
