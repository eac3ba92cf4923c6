"""Checkpoints written by an earlier sbtrain (tests/assets/checkpoints, from main at 33422c6,
whose recipes held every task's settings) still evaluate to the figures that version printed,
resume, and generate; the recipe printed at the start of training holds only what its task reads."""

from __future__ import annotations

import json
import shutil

import pytest

from cli.main import main
from sbtrain import checkpoint, evaluate
from sbtrain.tasks import load_recipe
from tests.conftest import DEBUG_RECIPE, ROOT, read_jsonl

ASSETS = ROOT / "tests" / "assets" / "checkpoints"
EXPECTED = json.loads((ASSETS / "evals-33422c6.json").read_text())
SMALL = ["model.d_model=32", "model.d_ff=64", "model.n_heads=2", "train.tensorboard=false"]
LISTOPS = ROOT / "recipes" / "lra" / "listops-cpu.yaml"
LISTOPS_DATA = [
    "listops.train=64",
    "listops.valid=16",
    "listops.test=16",
    "listops.min_tokens=8",
    "listops.max_tokens=32",
    "listops.max_depth=3",
    "data.tokens_per_sample=32",
]
COPY = [
    "copy.length=8",
    "copy.n_symbols=8",
    "copy.train_size=64",
    "copy.valid_size=16",
    "copy.test_size=16",
    "train.batch_size=8",
    "model.attention={kind: scatterbrain, sparse: local, window: 4, n_features: 4}",
]


@pytest.fixture(scope="module")
def listops_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listops") / "bin"
    assert main(["preprocess", str(LISTOPS), *LISTOPS_DATA, f"data.dir={folder}"]) == 0
    return folder


def cases(token_folder, listops_folder):
    """name -> (recipe, its overrides, the eval-ppl keyword arguments of the expected figures)."""
    return {
        "lm": (
            DEBUG_RECIPE,
            [f"data.dir={token_folder}"],
            {"split": "valid", "data_dir": str(token_folder)},
        ),
        "copy": (ROOT / "recipes" / "copy-demo.yaml", COPY, {"split": "test"}),
        "listops": (
            LISTOPS,
            [*LISTOPS_DATA, f"data.dir={listops_folder}"],
            {"split": "test", "data_dir": str(listops_folder)},
        ),
    }


@pytest.mark.parametrize("name", ["lm", "copy", "listops"])
def test_an_old_checkpoint_evaluates_as_it_did(name, token_folder, listops_folder):
    _, _, kwargs = cases(token_folder, listops_folder)[name]
    result = evaluate.main(ASSETS / f"{name}-33422c6.pt", progress=False, device="cpu", **kwargs)
    for key, value in EXPECTED[name].items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-6, abs=1e-9)
        assert result[key] == expected, key


@pytest.mark.parametrize("name", ["lm", "copy", "listops"])
def test_an_old_checkpoint_resumes(name, token_folder, listops_folder, tmp_path):
    recipe, overrides, _ = cases(token_folder, listops_folder)[name]
    shutil.copy(ASSETS / f"{name}-33422c6.pt", tmp_path / "checkpoint_last.pt")
    args = [
        str(recipe),
        *overrides,
        *SMALL,
        f"train.save_dir={tmp_path}",
        "train.max_updates=6",
        "train.log_interval=1",
    ]
    assert main(["train", *args]) == 0
    assert [r["update"] for r in read_jsonl(tmp_path / "train.jsonl")] == [5, 6]
    assert checkpoint.load(tmp_path / "checkpoint_last.pt")["counters"]["updates"] == 6


def test_an_old_copy_checkpoint_generates(capsys):
    assert (
        main(
            [
                "generate",
                str(ASSETS / "copy-33422c6.pt"),
                "--prompt",
                "0 3 1 4",
                "--max-tokens",
                "3",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    words = capsys.readouterr().out.split()
    assert len(words) == 3 and all(0 <= int(w) <= 8 for w in words)


def test_the_printed_recipe_holds_only_what_the_task_reads():
    copy = load_recipe(ROOT / "recipes" / "copy-demo.yaml").to_yaml()
    for absent in ("listops", "pathfinder", "adaptive", "pooling", "data:", "tokenizer"):
        assert absent not in copy
    assert "copy:" in copy and "output: softmax" in copy
    listops = load_recipe(LISTOPS).to_yaml()
    for absent in ("copy:", "pathfinder", "adaptive", "output", "tokenizer", "raw:"):
        assert absent not in listops
    assert "listops:" in listops and "pooling: cls" in listops
    wt103 = load_recipe(ROOT / "recipes" / "wt103.yaml").to_yaml()
    assert "adaptive_cutoffs" in wt103 and "pooling" not in wt103 and "copy" not in wt103
    bpe = load_recipe(ROOT / "recipes" / "wt103-bpe.yaml").to_yaml()  # softmax: no cutoffs
    assert "adaptive" not in bpe


def test_an_old_recipe_is_read_leniently_only_from_a_checkpoint(tmp_path):
    state = checkpoint.load(ASSETS / "copy-33422c6.pt")
    assert {"listops", "pathfinder", "data"} <= set(state["recipe"])  # every section, then
    path = tmp_path / "old.yaml"
    path.write_text(json.dumps(state["recipe"]))
    with pytest.raises(Exception, match="listops: settings of the listops task"):
        load_recipe(path)
