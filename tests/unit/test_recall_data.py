"""Recall data: every generator's invariants, checked by reading its JSONL back with plain json;
determinism across worker counts; disjoint splits; the binarized folder against the JSONL."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sbtrain.batch import IGNORE
from sbtrain.errors import UserError
from sbtrain.recall import format, generators
from sbtrain.recall.generators import MQARConfig, PasskeyConfig, SelectiveCopyConfig


def read(path: Path) -> list[tuple[list[int], list[int | None]]]:
    """An independent JSONL reader: (input, target) per line."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rows.append((record["input"], record["target"]))
    return rows


def generate(config, length: int, folder: Path, workers: int = 1) -> dict[str, list]:
    folder.mkdir(parents=True, exist_ok=True)
    generators.write_jsonl(config, length, folder, workers)
    return {split: read(folder / f"{split}.jsonl") for split in ("train", "valid", "test")
            if getattr(config, split)}  # fmt: skip


def test_mqar_sequences_are_as_zoology_specifies(tmp_path):
    k, v, t = 6, 40, 48
    config = MQARConfig(vocab_size=v, pairs=k, train=400, valid=20, test=20, chunk=64)
    splits = generate(config, t, tmp_path)
    for inputs, targets in [row for rows in splits.values() for row in rows]:
        assert len(inputs) == len(targets) == t
        keys, values = inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2]
        assert all(1 <= x < v // 2 for x in keys) and len(set(keys)) == k
        assert all(v // 2 <= x < v for x in values) and len(set(values)) == k
        scored = [i for i, y in enumerate(targets) if y is not None]
        assert len(scored) == k and all(i >= 2 * k and (i - 2 * k) % 2 == 0 for i in scored)
        queried = [inputs[i] for i in scored]
        assert sorted(queried) == sorted(keys)  # each key queried once
        for i in scored:  # its key is present once before it, and the answer is its value
            before = inputs[: 2 * k]
            assert before.count(inputs[i]) == 1
            assert targets[i] == before[before.index(inputs[i]) + 1]
        others = [x for i, x in enumerate(inputs) if i >= 2 * k and i not in scored]
        assert others == [0] * len(others)  # zero filler


def test_mqar_gaps_follow_the_power_law(tmp_path):
    """a = 1: every slot equally likely, K/slots each (a closed form); a = 0.01: the first slot is
    queried far more often than the last."""
    k, t, n = 4, 40, 3000
    slots = (t - 2 * k) // 2
    counts = {}
    for a in (1.0, 0.01):
        config = MQARConfig(vocab_size=64, pairs=k, power_a=a, train=n, valid=0, test=0)
        rows = generate(config, t, tmp_path / str(a))["train"]
        gaps = Counter((i - 2 * k) // 2 for _, y in rows for i, x in enumerate(y) if x is not None)
        counts[a] = [gaps[g] for g in range(slots)]
    expected = n * k / slots  # each slot is in a draw of k out of `slots` with chance k / slots
    sd = math.sqrt(n * (k / slots) * (1 - k / slots))
    assert all(abs(c - expected) < 5 * sd for c in counts[1.0])
    assert counts[0.01][0] > 5 * counts[0.01][-1]


def test_mqar_random_filler_fills_the_rest(tmp_path):
    config = MQARConfig(vocab_size=64, pairs=4, random_filler=True, train=200, valid=0, test=0)
    rows = generate(config, 32, tmp_path)["train"]
    filler = [x for inputs, y in rows for i, x in enumerate(inputs) if i >= 8 and y[i] is None]
    assert len(set(filler)) > 40 and all(0 <= x < 64 for x in filler)


def test_selective_copying_copies_the_data_tokens_in_order(tmp_path):
    n, t = 5, 24
    config = SelectiveCopyConfig(vocab_size=16, tokens=n, train=300, valid=10, test=10, chunk=50)
    for inputs, targets in generate(config, t, tmp_path)["train"]:
        context = inputs[: t - n]
        data = [x for x in context if x != 0]
        assert len(data) == n and all(2 <= x < 16 for x in data)
        assert inputs[t - n] == 1 and inputs[t - n + 1 :] == data[:-1]
        assert targets[: t - n] == [None] * (t - n) and targets[t - n :] == data


def test_passkey_hides_one_key_at_every_depth(tmp_path):
    m, t = 3, 20
    config = PasskeyConfig(vocab_size=32, key_length=m, train=2000, valid=10, test=10, chunk=200)
    depths = Counter()
    for inputs, targets in generate(config, t, tmp_path)["train"]:
        body = t - m
        assert inputs[body] == 2 and inputs[:body].count(2) == 0
        assert inputs[:body].count(1) == 1
        depth = inputs.index(1)
        key = inputs[depth + 1 : depth + 1 + m]
        assert depth + m < body and all(3 <= x < 32 for x in key)
        assert targets[body:] == key and inputs[body + 1 :] == key[:-1]
        assert targets[:body] == [None] * body
        depths[depth] += 1
    assert sorted(depths) == list(range(t - 2 * m))  # every depth the body allows


@pytest.mark.parametrize(
    "config",
    [
        MQARConfig(vocab_size=64, pairs=4, train=300, valid=40, test=40, chunk=32, seed=3),
        SelectiveCopyConfig(vocab_size=12, tokens=4, train=300, valid=40, test=40, chunk=32),
        PasskeyConfig(vocab_size=16, key_length=2, train=300, valid=40, test=40, chunk=32),
    ],
    ids=lambda c: c.name,
)
def test_splits_are_disjoint_and_the_same_for_one_and_two_workers(config, tmp_path):
    one = generate(config, 24, tmp_path / "one", workers=1)
    generate(config, 24, tmp_path / "two", workers=2)
    for split in one:
        one_bytes = (tmp_path / "one" / f"{split}.jsonl").read_bytes()
        assert one_bytes == (tmp_path / "two" / f"{split}.jsonl").read_bytes()
        assert len(one[split]) == getattr(config, split)
    inputs = [tuple(x) for rows in one.values() for x, _ in rows]
    assert len(inputs) == len(set(inputs))  # no sequence in two splits (or twice in one)


def test_a_task_too_small_for_its_sizes_is_refused(tmp_path):
    with pytest.raises(UserError, match="found only"):
        generate(PasskeyConfig(vocab_size=4, key_length=1, train=50, valid=0, test=0), 4, tmp_path)
    with pytest.raises(UserError, match="pairs and their queries need"):
        generate(MQARConfig(pairs=8), 16, tmp_path)


def test_the_binarized_folder_holds_the_jsonl(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "bin"
    config = MQARConfig(vocab_size=64, pairs=4, train=50, valid=5, test=5)
    splits = generate(config, 32, raw)
    out.mkdir()
    stats = format.binarize(raw, out, None, 32, {"test": True})
    meta = json.loads((out / "meta.json").read_text())
    largest = max(max(x) for rows in splits.values() for inp, _ in rows for x in [inp])
    assert meta["vocab_size"] >= largest + 1 and meta["dtype"] == "uint16"
    for split, rows in splits.items():
        data = format.Sequences(out, split)
        assert len(data) == len(rows) == stats[split]["sequences"]
        for i, (inputs, targets) in enumerate(rows):
            x, y = data[i]
            assert x.tolist() == inputs
            assert y.tolist() == [IGNORE if t is None else t for t in targets]


def test_a_split_asked_to_hold_nothing_is_left_out(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "bin"
    raw.mkdir()
    generators.write_jsonl(MQARConfig(vocab_size=64, pairs=4, train=20, valid=0, test=3), 32, raw)
    assert sorted(p.name for p in raw.iterdir()) == ["test.jsonl", "train.jsonl"]
    out.mkdir()
    stats = format.binarize(raw, out, None, 32, {"test": True})
    assert sorted(stats) == ["test", "train"] and stats["train"]["sequences"] == 20


BAD = [
    ('{"input": [1, 2], "target": [null]}', "input has 2 ids, target 1"),
    ('{"input": [1, -2], "target": [null, 3]}', "input id -2 is outside"),
    ('{"input": [1, 99], "target": [null, 3]}', "input id 99 is outside 0..49"),
    ('{"input": [1, 2], "target": [null, 1.5]}', "target holds 1.5"),
    ('{"input": [1, "a"], "target": [null, 1]}', "input holds 'a'"),
    ('{"input": [1, 2], "target": [null, null]}', "no position is scored"),
    ('{"input": [1, 2, 3, 4, 5], "target": [1, 1, 1, 1, 1]}', "longer than data.tokens_per_sample"),
    ('{"input": [1, 2], "target": [null, 1]', "not valid JSON"),
    ("[1, 2]", 'expected {"input": [ids]'),
    ('{"input": [], "target": []}', "an empty sequence"),
]


@pytest.mark.parametrize("line, message", BAD, ids=[m for _, m in BAD])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": [1, 2], "target": [null, 2]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:2: ") as e:
        list(format.read_lines(path, 50, 4))
    assert message in str(e.value)


def test_an_empty_split_and_non_utf8_text_are_refused(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="the split is empty"):
        list(format.read_lines(empty, None, 8))
    latin = tmp_path / "valid.jsonl"
    latin.write_bytes(b'{"input": [1], "target": [1]}\n\xe9\n')
    with pytest.raises(UserError, match="not UTF-8"):
        list(format.read_lines(latin, None, 8))


def test_a_cut_binarized_file_is_refused(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "bin"
    raw.mkdir()
    out.mkdir()
    (raw / "train.jsonl").write_text('{"input": [1, 2, 3], "target": [null, 2, 3]}\n')
    format.binarize(raw, out, 10, 8, {})
    data = (out / "train.inputs.bin").read_bytes()
    (out / "train.inputs.bin").write_bytes(data[:-1])
    with pytest.raises(UserError, match="cut short"):
        format.Sequences(out, "train")
    (out / "train.inputs.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="disagree"):
        format.Sequences(out, "train")
    assert np.fromfile(out / "train.offsets.bin", "<i8").tolist() == [0, 3]
    meta = json.loads((out / "meta.json").read_text())
    for key, value in (("dtype", "float64"), ("splits", None), ("vocab_size", "10")):
        (out / "meta.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(UserError, match=r"meta\.json: damaged"):
            format.Sequences(out, "train")
