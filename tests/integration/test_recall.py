"""Scored sequences through the real CLI: a bring-your-own JSONL folder -> preprocess -> train ->
eval-ppl (loss, accuracy, exact match, checked against the model's own predictions), attention
swaps; bad input gets one line naming file:line and leaves no data folder behind."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from sbtrain.batch import IGNORE
from sbtrain.checkpoint import load_model
from sbtrain.recall.format import Sequences
from tests.conftest import ROOT, one_error_line

RECIPE = ROOT / "recipes" / "recall" / "sequences.yaml"
TINY = [
    "model.d_model=32",
    "model.d_ff=64",
    "train.batch_size=16",
    "train.max_updates=30",
    "train.validate_interval=15",
    "train.log_interval=5",
    "data.tokens_per_sample=16",
]


def write_task(folder, n: int = 200, seed: int = 0) -> None:
    """Sequences `a b c ... | a`: after a marker (1) the model recalls the first token; ragged
    lengths; a second scored position recalls the second token."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", n), ("valid", 40), ("test", 40)):
        lines = []
        for _ in range(count):
            body = torch.randint(
                2, 20, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
            ).tolist()
            inputs = [*body, 1, body[0]]
            targets = [None] * len(body) + [body[0], body[1]]
            lines.append(json.dumps({"input": inputs, "target": targets}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    write_task(root / "raw")
    data, save = root / "bin", root / "run"
    common = [str(RECIPE), f"data.raw={root / 'raw'}", f"data.dir={data}", *TINY]
    assert main(["preprocess", *common]) == 0
    assert main(["train", *common, f"train.save_dir={save}"]) == 0
    return data, save


def test_eval_reports_accuracy_and_exact_match_of_the_scored_positions(trained, capsys):
    data, save = trained
    ckpt = save / "checkpoint_best.pt"
    capsys.readouterr()
    assert main(["eval-ppl", str(ckpt), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, *_ = load_model(ckpt, torch.device("cpu"))
    test = Sequences(data, "test")
    hits = scored = exact = 0
    with torch.no_grad():
        for i in range(len(test)):
            x, y = test[i]
            guess = model.predict(model(x[None])[0])
            keep = y != IGNORE
            hits += int((guess[keep] == y[keep]).sum())
            scored += int(keep.sum())
            exact += bool((guess[keep] == y[keep]).all())
    assert record["tokens"] == scored == 2 * 40 and record["sequences"] == 40
    assert record["accuracy"] == pytest.approx(hits / scored)
    assert record["exact_match"] == pytest.approx(exact / 40)
    assert main(["eval-ppl", str(ckpt), "--attention", "local", "window=2"]) == 0
    assert "exact match" in capsys.readouterr().out


def test_the_vocabulary_comes_from_the_recipe_or_the_data(tmp_path):
    write_task(tmp_path / "raw", n=20)
    for extra, expected in (([], 20), (["data.vocab_size=300"], 300)):
        out = tmp_path / f"bin{expected}"
        args = [str(RECIPE), f"data.raw={tmp_path / 'raw'}", f"data.dir={out}", *extra]
        assert main(["preprocess", *args]) == 0
        assert json.loads((out / "meta.json").read_text())["vocab_size"] == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"input": [1, 2], "target": [null]}', ":3: input has 2 ids, target 1"),
        ('{"input": [1, 2], "target": [null, null]}', ":3: no position is scored"),
        ('{"input": [1, 2], "target": [null, 9]}', ":3: target id 9 is outside 0..7"),
    ],
)
def test_bad_input_is_one_line_naming_the_line_and_no_folder(tmp_path, capsys, line, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = '{"input": [1, 2], "target": [null, 2]}'
    (raw / "train.jsonl").write_text(f"{good}\n{good}\n{line}\n")
    out = tmp_path / "bin"
    args = ["preprocess", str(RECIPE), f"data.raw={raw}", f"data.dir={out}", "data.vocab_size=8"]
    assert main(args) == 2
    error = one_error_line(capsys)
    assert f"{raw / 'train.jsonl'}{message}" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing half-written


def test_a_generated_task_trains_and_its_settings_are_checked(tmp_path, capsys):
    recipe = ROOT / "recipes" / "recall" / "mqar-cpu.yaml"
    small = [
        "mqar.train=200",
        "mqar.valid=20",
        "mqar.test=20",
        f"data.dir={tmp_path / 'bin'}",
        f"train.save_dir={tmp_path / 'run'}",
        *TINY[:3],
        "train.max_updates=4",
        "train.validate_interval=2",
        "data.tokens_per_sample=32",
        "mqar.pairs=4",
    ]
    assert main(["preprocess", str(recipe), *small]) == 0
    assert main(["train", str(recipe), *small]) == 0
    assert main(["train", str(recipe), *small, "mqar.pairs=9"]) == 2
    assert "mqar.pairs: 9 pairs and their queries need data.tokens_per_sample >= 36" in (
        one_error_line(capsys)
    )
