"""The multi-seed aggregator (sbtrain/bench/seeds.py) on a small hand-made JSON-lines file."""

from __future__ import annotations

import io
import json

import pytest

from sbtrain.bench.seeds import late_drop, main, markdown, mean_std, summarise

RUNS = [  # ppl 10, 12, 14 -> mean 12, sample std 2; loss 1, 2, 6 -> mean 3, std sqrt(7)
    {"study": "train", "name": "full", "seed": 1, "ppl": 10.0, "loss_nats": 1.0},
    {"study": "train", "name": "local", "seed": 1, "ppl": 7.5, "loss_nats": 0.5},
    {"study": "train", "name": "full", "seed": 2, "ppl": 12.0, "loss_nats": 2.0},
    {"study": "train", "name": "full", "seed": 3, "ppl": 14.0, "loss_nats": 6.0},
    {"study": "dropin", "name": "full", "seed": 1, "ppl": 20.0, "loss_nats": 3.0},
    {"study": "dropin", "name": "full", "seed": 2, "ppl": 21.0, "loss_nats": 3.0},
]


def test_mean_and_sample_standard_deviation_by_hand():
    assert mean_std([10.0, 12.0, 14.0]) == (12.0, 2.0)
    assert mean_std([5.0]) == (5.0, None)  # one run has no spread


def test_groups_by_study_and_name_in_first_seen_order():
    rows = summarise(RUNS)
    assert [(r["study"], r["name"], r["n"], r["seeds"]) for r in rows] == [
        ("train", "full", 3, "1,2,3"),
        ("train", "local", 1, "1"),
        ("dropin", "full", 2, "1,2"),
    ]
    full, local, dropin = rows
    assert full["ppl_mean"] == pytest.approx(12.0) and full["ppl_std"] == pytest.approx(2.0)
    assert full["loss_nats_mean"] == pytest.approx(3.0)
    assert full["loss_nats_std"] == pytest.approx(7**0.5)  # (4 + 1 + 9) / 2 = 7
    assert local["ppl_std"] is None
    assert dropin["ppl_mean"] == pytest.approx(20.5)
    assert dropin["ppl_std"] == pytest.approx(0.5**0.5)  # (0.25 + 0.25) / 1


def test_command_prints_and_writes_the_markdown_table(tmp_path, capsys):
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RUNS) + "\n\n")
    out = tmp_path / "table.md"
    assert main([str(jsonl), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| train | full | 3 | 12.00 ± 2.00 |" in table
    assert "| train | local | 1 | 7.50 |" in table
    assert "| dropin | full | 2 | 20.50 ± 0.71 |" in table
    assert out.read_text() == table
    assert json.loads(out.with_suffix(".json").read_text())[0]["ppl_std"] == pytest.approx(2.0)


def test_bad_input_gets_one_line_and_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "full", "ppl": 1.0, "loss_nats": 0.0}\nnot json\n')
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m sbtrain.bench.seeds: error: {bad}:2: not a JSON line"
    )
    assert main([str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: cannot read it" in capsys.readouterr().err
    bad.write_text('{"name": "full", "loss_nats": 0.0}\n')
    assert main([str(bad)]) == 2
    assert "a run has no 'ppl' field" in capsys.readouterr().err


def test_late_drop_compares_the_end_with_the_last_point_before_four_fifths():
    curve = [[50, 9.0], [400, 5.0], [450, 4.9], [500, 4.0]]  # 400 <= 0.8 * 500 < 450
    assert late_drop(curve) == pytest.approx(20.0)  # (5 - 4) / 5
    assert late_drop([[100, 3.0], [500, 3.0]]) == 0.0  # flat
    assert late_drop([[500, 3.0]]) is None  # nothing before 80%
    assert late_drop([[100, 0.0], [500, 0.0]]) is None  # no relative change from a zero loss
    runs = [
        {"name": "a", "seed": 1, "ppl": 1.0, "loss_nats": 0.0, "valid_curve": curve},
        {"name": "a", "seed": 2, "ppl": 1.0, "loss_nats": 0.0, "valid_curve": [[1, 2.0], [5, 1.0]]},
        {"name": "b", "seed": 1, "ppl": 1.0, "loss_nats": 0.0},
    ]
    a, b = summarise(runs)
    assert a["late_drop_mean"] == pytest.approx((20.0 + 50.0) / 2)
    assert "late_drop_mean" not in b
    table = markdown(summarise(runs))
    assert "| a | 2 | 1.00 ± 0.00 | 35.00% |" in table and table.endswith("| b | 1 | 1.00 | |")


def test_accuracy_is_shown_in_percent():
    runs = [
        {"study": "listops", "name": "full", "seed": 1, "accuracy": 0.36, "loss_nats": 1.0},
        {"study": "listops", "name": "full", "seed": 2, "accuracy": 0.38, "loss_nats": 1.0},
    ]
    table = markdown(summarise(runs, "accuracy"), "accuracy")
    assert "accuracy % (mean ± std)" in table
    assert "| listops | full | 2 | 37.00 ± 1.41 |" in table  # std 0.02 / sqrt(2) * 100


def _record(monkeypatch, capsys, argv, stdin):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(["record", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_record_joins_fields_the_run_s_curve_and_the_evaluation(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    valid = [
        {"update": 100, "loss": 3.0, "accuracy": 0.2, "wall": 10.0},
        {"update": 200, "loss": 2.5, "accuracy": 0.3, "wall": 21.5},
    ]
    (run / "valid.jsonl").write_text("".join(json.dumps(v) + "\n" for v in valid))
    evaluation = {"split": "test", "accuracy": 0.31, "loss_nats": 1.7}
    argv = [str(run), "study=listops", "name=full", "seed=2", "attention_spec=local window=8"]
    status, out, err = _record(monkeypatch, capsys, argv, json.dumps(evaluation))
    assert status == 0 and err == ""
    assert json.loads(out) == {
        "study": "listops",
        "name": "full",
        "seed": 2,
        "attention_spec": "local window=8",
        "updates": 200,
        "train_seconds": 21.5,
        "valid_curve": [[100, 3.0, 0.2], [200, 2.5, 0.3]],
        **evaluation,
    }
    # a language model's validations have no accuracy: [update, loss] only
    (run / "valid.jsonl").write_text(json.dumps({"update": 5, "loss": 4.0, "wall": 1.0}) + "\n")
    status, out, _ = _record(monkeypatch, capsys, [str(run), "name=x"], "{}")
    assert status == 0 and json.loads(out)["valid_curve"] == [[5, 4.0]]


@pytest.mark.parametrize(
    "argv, stdin, message",
    [
        (["{run}", "seed=one"], "{}", "seed='one': not an integer"),
        (["{run}", "name"], "{}", "'name': fields are key=value"),
        (["{run}", "name=x"], "not json", "stdin: not eval-ppl's JSON"),
        (["{run}/absent", "name=x"], "{}", "valid.jsonl: cannot read it"),
        (["{empty}", "name=x"], "{}", "valid.jsonl: no validation was logged"),
        (["{nowall}", "name=x"], "{}", "a validation record has no 'wall' field"),
    ],
)
def test_record_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, argv, stdin, message):
    folders = {name: tmp_path / name for name in ("run", "empty", "nowall")}
    for folder in folders.values():
        folder.mkdir()
    (folders["run"] / "valid.jsonl").write_text('{"update": 1, "loss": 1.0, "wall": 1.0}\n')
    (folders["empty"] / "valid.jsonl").write_text("")
    (folders["nowall"] / "valid.jsonl").write_text('{"update": 1, "loss": 1.0}\n')
    argv = [a.format(**folders) for a in argv]
    status, out, err = _record(monkeypatch, capsys, argv, stdin)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and message in err
