"""Shared fixtures: small corpora and preprocessed folders, built on the fly."""

from __future__ import annotations

import itertools
import json
import math
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
if not torch.cuda.is_available():  # the Triton kernels' tests run in its interpreter on CPU;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads this once, at first import


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


def make_token_folder(folder: Path) -> Path:
    """A learnable stream with long-range structure: runs of 200 tokens drawn from one of 4
    overlapping 16-token "topics" (ids 4..63), so earlier tokens tell which topic a run is in.
    train: 20k tokens, valid: 3k, vocabulary 64."""
    rng = np.random.default_rng(0)
    topics = [rng.choice(np.arange(4, 64), 16, replace=False) for _ in range(4)]

    def stream(n):
        runs = [rng.choice(topics[rng.integers(4)], 200) for _ in range(n // 200 + 1)]
        return np.concatenate(runs)[:n].astype(np.uint16)

    return write_token_folder(folder, {"train": stream(20_000), "valid": stream(3_000)}, 64)


@pytest.fixture(scope="session")
def token_folder(tmp_path_factory) -> Path:
    return make_token_folder(tmp_path_factory.mktemp("tokens"))


def write_corpus(folder, seed=0):
    """A WikiText-like corpus: headings, blank lines, Zipfian words from a 300-word vocabulary."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    p = 1.0 / np.arange(1, 301)
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    for split, articles in (("train", 60), ("valid", 6), ("test", 6)):
        lines = []
        for a in range(articles):
            lines += [f" = Article {split} {a} = ", ""]
            for _ in range(rng.integers(2, 6)):
                lines.append(" " + " ".join(rng.choice(words, rng.integers(5, 40), p=p)) + " ")
            lines.append("")
        (folder / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def expected_tokens(path) -> int:
    """Whitespace tokens plus one end-of-line per line, counted from the raw text."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines = lines[:-1]
    return sum(len(line.split()) for line in lines) + len(lines)


def uniform_checkpoint(source: Path, target: Path, **model_overrides) -> Path:
    """A copy of checkpoint `source` (its recipe changed by `model_overrides`, e.g. output=adaptive)
    whose final layer norm outputs zeros: every logit of the tied softmax, and of the adaptive
    softmax's head and tail clusters (no biases), is 0, so the NLL is known in closed form."""
    from sbtrain.model import TransformerLM
    from sbtrain.tasks import recipe_from_dict

    state = torch.load(source, map_location="cpu", weights_only=True)
    tree = state["recipe"]
    tree["model"] = {**tree["model"], **model_overrides}
    recipe = recipe_from_dict(tree)
    model = TransformerLM(recipe.model, int(state["vocab_size"]), recipe.data.tokens_per_sample)
    model.load_state_dict(state["model"], strict=False)  # an adaptive head keeps its fresh init
    torch.nn.init.zeros_(model.ln_f.weight)
    torch.nn.init.zeros_(model.ln_f.bias)
    state["model"] = model.state_dict()
    torch.save(state, target)
    return target


def uniform_nll(targets: np.ndarray, vocab_size: int, cutoffs: list[int] | None = None) -> float:
    """Mean NLL (nats) of `targets` under all-equal logits: ln V for the tied softmax. Adaptive
    softmax with cutoffs c_0 < ... < c_{K-1} < V: the head is uniform over its c_0 words and K
    clusters, and cluster i uniform over its c_{i+1} - c_i words (c_K = V), so a head word costs
    ln(c_0 + K) and a word of cluster i ln(c_0 + K) + ln(c_{i+1} - c_i)."""
    if not cutoffs:
        return math.log(vocab_size)
    bounds = [*cutoffs, vocab_size]
    head = math.log(cutoffs[0] + len(cutoffs))
    cost = np.full(vocab_size, head)
    for low, high in itertools.pairwise(bounds):
        cost[low:high] += math.log(high - low)
    return float(cost[targets.astype(np.int64)].mean())


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


@pytest.fixture(scope="session")
def trained_debug(token_folder, tmp_path_factory) -> Path:
    """A debug-size model trained for 150 updates on `token_folder`: its save_dir."""
    from cli.main import main

    save_dir = tmp_path_factory.mktemp("trained")
    args = [
        "train",
        str(DEBUG_RECIPE),
        f"data.dir={token_folder}",
        f"train.save_dir={save_dir}",
        "train.tensorboard=false",
        "train.max_updates=150",
        "train.max_epochs=10",
    ]
    assert main(args) == 0
    return save_dir


def one_error_line(capsys) -> str:
    """The single stderr line of a refused command (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """`write_corpus` raw text and its preprocessed folder (debug recipe, word tokenizer)."""
    from cli.main import main

    root = tmp_path_factory.mktemp("words")
    raw, data = write_corpus(root / "raw"), root / "bin"
    assert main(["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}"]) == 0
    return raw, data


@pytest.fixture
def lsh_path(request, monkeypatch):
    """Parametrised `indirect`: "dense" or "gathered" forces that path of LSH's exact sums
    (`sbtrain.attention.lsh.DENSE`); None leaves the automatic choice."""
    import sbtrain.attention.lsh

    path = getattr(request, "param", None)
    if path is not None:
        monkeypatch.setattr(sbtrain.attention.lsh, "DENSE", path == "dense")
    return path


def with_lsh_paths(names) -> list[tuple[str, str | None]]:
    """(name, path) pairs for `lsh_path`: both paths for every case with LSH, one run for others."""
    return [(n, p) for n in names for p in (("dense", "gathered") if "lsh" in n else (None,))]
