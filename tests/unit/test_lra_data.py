"""Long Range Arena data: the classification format, ListOps and Pathfinder generators checked
by independent evaluators, and the readers of the downloaded datasets on files written here in
their published layouts."""

from __future__ import annotations

import json
import math
import pickle
import statistics
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from sbtrain.lra import listops, pathfinder, readers
from sbtrain.lra.format import (
    Examples,
    LraDataError,
    make_meta,
    open_split,
    write_meta,
    write_split,
)

# ---------------------------------------------------------------------------------------------
# format


def _write_folder(folder: Path, pairs: bool = False) -> list[list[int]]:
    docs = [[3, 1, 4], [], [1, 5, 9, 2, 6], [5]]
    labels = [0, 2, 1, 2]
    second = [[*d[::-1], 7] for d in docs] if pairs else None
    batches = [
        Examples(
            [np.array(d) for d in docs[:2]],
            labels[:2],
            second and [np.array(d) for d in second[:2]],
        ),
        Examples(
            [np.array(d) for d in docs[2:]],
            labels[2:],
            second and [np.array(d) for d in second[2:]],
        ),
    ]
    stats = write_split(folder, "train", batches, "uint8")
    assert stats.examples == 4
    assert stats.label_counts == {"0": 1, "1": 1, "2": 2}
    lengths = [len(d) for d in docs] + ([len(d) for d in second] if pairs else [])
    assert (stats.min_length, stats.max_length, stats.tokens) == (
        min(lengths),
        max(lengths),
        sum(lengths),
    )
    assert stats.mean_length == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    write_meta(
        folder,
        make_meta(
            "t",
            "symbols",
            10,
            3,
            ["train"],
            streams=2 if pairs else 1,
            symbols=[str(i) for i in range(10)],
        ),
    )
    return docs, labels, second


def test_format_roundtrip(tmp_path):
    docs, labels, _ = _write_folder(tmp_path)
    split = open_split(tmp_path, "train")
    assert len(split) == 4
    for i, (doc, label) in enumerate(zip(docs, labels)):
        tokens, got = split[i]
        assert tokens.tolist() == doc and got == label
    assert split.lengths().tolist() == [3, 0, 5, 1]
    assert json.loads((tmp_path / "train.json").read_text())["examples"] == 4
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["vocab_size"], meta["pad_id"], meta["cls_id"]) == (12, 10, 11)


def test_format_pairs(tmp_path):
    docs, labels, second = _write_folder(tmp_path, pairs=True)
    split = open_split(tmp_path, "train")
    for i in range(4):
        a, b, label = split.pair(i)
        assert (a.tolist(), b.tolist(), label) == (docs[i], second[i], labels[i])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "train.bin").write_bytes(b"\0" * 8), "offsets run"),
        (lambda f: (f / "train.idx").write_bytes(b"\0" * 12), "not a whole number"),
        (lambda f: np.arange(3, dtype="<i8").tofile(f / "train.idx"), "offsets for 4 labels"),
        (lambda f: np.array([0, 4, 3, 8, 9], "<i8").tofile(f / "train.idx"), "decrease"),
        (lambda f: np.array([0, 1, 5, 1], "<i8").tofile(f / "train.labels"), "class 5"),
        (lambda f: (f / "train.labels").unlink(), "missing"),
        (lambda f: (f / "meta.json").write_text('{"format": "sbtrain-bin-1"}'), "format"),
        (lambda f: (f / "meta.json").write_text("{not json"), "unreadable"),
    ],
)
def test_format_damage_is_one_clear_error(tmp_path, damage, message):
    _write_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(LraDataError, match=message) as e:
        open_split(tmp_path, "train")
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_format_refuses_ids_beyond_dtype(tmp_path):
    with pytest.raises(ValueError, match="outside uint8"):
        write_split(tmp_path, "train", [Examples([np.array([256])], [0])], "uint8")


# ---------------------------------------------------------------------------------------------
# ListOps


def stack_evaluate(text: str) -> tuple[int, int]:
    """Value and operator nesting depth of a ListOps sequence, read token by token with a
    stack (the generator evaluates a tree recursively)."""
    ops = {
        "[MAX": max,
        "[MIN": min,
        "[MED": lambda a: math.floor(statistics.median(a)),
        "[SM": lambda a: sum(a) % 10,
    }
    stack: list[list] = [[None]]
    depth = 0
    for token in text.split():
        if token in ops:
            stack.append([token])
            depth = max(depth, len(stack) - 1)
        elif token == "]":
            op, *args = stack.pop()
            assert len(args) >= 2, text
            stack[-1].append(ops[op](args))
        else:
            stack[-1].append(int(token))
    assert len(stack) == 1 and len(stack[0]) == 2
    return stack[0][1], depth


def _max_args(text: str) -> int:
    counts, best = [], 0
    for token in text.split():
        if token.startswith("["):
            counts.append(0)
        elif token == "]":
            best = max(best, counts.pop())
            if counts:
                counts[-1] += 1
        elif counts:
            counts[-1] += 1
    return best


SMALL = listops.ListOpsConfig(
    train=300,
    valid=50,
    test=50,
    min_tokens=30,
    max_tokens=120,
    max_depth=4,
    max_args=5,
    seed=3,
    chunk=40,
)


@pytest.fixture(scope="module")
def small_listops():
    return listops.generate(SMALL)


def test_listops_labels_lengths_limits(small_listops):
    depths = []
    for examples in small_listops.values():
        for tokens, label in zip(examples.tokens, examples.labels):
            text = listops.to_text(tokens)
            value, depth = stack_evaluate(text)
            assert value == label, text
            assert SMALL.min_tokens <= len(tokens) <= SMALL.max_tokens
            assert depth <= SMALL.max_depth - 1 and _max_args(text) <= SMALL.max_args
            depths.append(depth)
    assert max(depths) == SMALL.max_depth - 1  # the limit is reached, not just respected
    sizes = {name: len(e.labels) for name, e in small_listops.items()}
    assert sizes == {"train": 300, "valid": 50, "test": 50}
    labels = np.concatenate([e.labels for e in small_listops.values()])
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 400 and (counts > 0).sum() == 10, counts  # every class occurs


def test_listops_even_median_rounds_down():
    assert listops.apply(listops.MED, [1, 2]) == 1
    assert listops.apply(listops.MED, [9, 0, 4, 3]) == 3
    assert listops.apply(listops.MED, [7, 2, 5]) == 5
    assert listops.apply(listops.SM, [9, 8, 7]) == 4


def test_listops_unique_across_splits(small_listops):
    seqs = [t.tobytes() for e in small_listops.values() for t in e.tokens]
    assert len(set(seqs)) == len(seqs) == 400


def test_listops_dedupes_when_few_sequences_exist():
    # 4-token trees "[OP d d ]": 4 operators x 100 digit pairs = 400 distinct sequences
    tiny = listops.ListOpsConfig(train=300, valid=25, test=25, min_tokens=4, max_tokens=4, chunk=50)
    seqs = [t.tobytes() for e in listops.generate(tiny).values() for t in e.tokens]
    assert len(set(seqs)) == len(seqs) == 350
    with pytest.raises(ValueError, match="found only 400 distinct sequences"):
        listops.generate(
            listops.ListOpsConfig(train=401, valid=0, test=0, min_tokens=4, max_tokens=4, chunk=50)
        )


def test_listops_deterministic_any_workers(small_listops):
    again = listops.generate(SMALL, workers=2)
    for name, examples in small_listops.items():
        assert [t.tobytes() for t in again[name].tokens] == [t.tobytes() for t in examples.tokens]
        assert again[name].labels == examples.labels
    other = listops.generate(SMALL.__class__(**{**SMALL.__dict__, "seed": 4}))
    assert [t.tobytes() for t in other["train"].tokens] != [
        t.tobytes() for t in small_listops["train"].tokens
    ]


def test_listops_prepare_writes_folder(tmp_path):
    config = listops.ListOpsConfig(train=20, valid=4, test=4, min_tokens=10, max_tokens=40, chunk=8)
    stats = listops.prepare(tmp_path, config)
    split = open_split(tmp_path, "valid")
    assert len(split) == 4 and stats["train"].examples == 20
    assert split.meta["symbols"][split.meta["pad_id"] - 1] == "[SM"
    for i in range(len(split)):
        tokens, label = split[i]
        assert stack_evaluate(listops.to_text(tokens))[0] == label
    assert 10 <= stats["test"].min_length <= stats["test"].max_length <= 40


# ---------------------------------------------------------------------------------------------
# Pathfinder


def components(image: np.ndarray) -> np.ndarray:
    """Label of each bright pixel's 8-connected component (0 = dark), by breadth-first fill."""
    h, w = image.shape
    labels = np.zeros((h, w), int)
    count = 0
    for y0, x0 in zip(*np.nonzero(image)):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if image[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels


PF = pathfinder.PathfinderConfig(train=200, valid=10, test=10, chunk=50, seed=5)


def test_pathfinder_labels_match_the_pixels():
    images = pathfinder.generate(PF, "train", 0, 200)
    r = math.ceil(PF.marker_radius)
    disk = [
        (dy, dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if dy * dy + dx * dx <= PF.marker_radius**2
    ]
    for pixels, label, markers in images:
        image = pixels.reshape(PF.size, PF.size)
        assert pixels.dtype == np.uint8 and set(np.unique(pixels)) <= {0, 255}
        for y, x in markers:
            assert all(image[y + dy, x + dx] for dy, dx in disk)  # a round marker is drawn
        comps = components(image)
        # every path is its own component: paths of different identity never touch
        assert comps.max() == 2 + PF.distractors
        (ya, xa), (yb, xb) = markers
        assert (comps[ya, xa] == comps[yb, xb]) == bool(label)
    assert sum(label for _, label, _ in images) == 100  # balanced


def test_pathfinder_difficulty_is_path_length():
    def bright(config):
        return np.mean([(p > 0).sum() for p, _, _ in pathfinder.generate(config, "train", 0, 40)])

    short = pathfinder.PathfinderConfig(train=40, segments=4, distractors=0, chunk=40)
    long = pathfinder.PathfinderConfig(train=40, segments=12, distractors=0, chunk=40)
    # two paths of segments * 2.5 px each, plus two 13-pixel markers
    assert bright(long) - bright(short) == pytest.approx(2 * 8 * 2.5, rel=0.25)


def test_pathfinder_prepare_deterministic_any_workers(tmp_path):
    config = pathfinder.PathfinderConfig(train=24, valid=6, test=6, chunk=6, seed=1)
    stats = pathfinder.prepare(tmp_path / "one", config)
    pathfinder.prepare(tmp_path / "two", config, workers=2)
    for split in ("train", "valid", "test"):
        for name in (f"{split}.bin", f"{split}.labels", f"{split}.idx"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    split = open_split(tmp_path / "one", "train")
    assert split.lengths().tolist() == [1024] * 24 and split.meta["shape"] == [32, 32]
    assert stats["train"].label_counts == {"0": 12, "1": 12}
    assert (split.meta["vocab_size"], split.meta["pad_id"], split.meta["dtype"]) == (
        258,
        256,
        "uint8",
    )
    again = pathfinder.generate(config, "valid", 2, 5)
    assert [p.tobytes() for p, _, _ in again] == [
        open_split(tmp_path / "one", "valid")[i][0].tobytes() for i in range(2, 5)
    ]


# ---------------------------------------------------------------------------------------------
# readers of the downloaded datasets


def test_imdb_reader(tmp_path):
    reviews = {
        ("train", "pos"): [b"great film", "très bon".encode()],
        ("train", "neg"): [b"bad"],
        ("test", "pos"): [b"x" * 5000],
        ("test", "neg"): [b"meh", b"no"],
    }
    for (split, kind), texts in reviews.items():
        (tmp_path / "aclImdb" / split / kind).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "aclImdb" / split / kind / f"{i}_7.txt").write_bytes(text)
    stats = readers.prepare_text(tmp_path / "out", tmp_path)  # the parent of aclImdb works too
    for split in ("train", "test"):
        got = sorted((bytes(t.tolist()), label) for t, label in open_split(tmp_path / "out", split))
        want = sorted(
            (text[:4000], int(kind == "pos"))
            for (s, kind), texts in reviews.items()
            if s == split
            for text in texts
        )
        assert got == want
    assert stats["test"].max_length == 4000 and stats["test"].label_counts == {"0": 2, "1": 1}
    (tmp_path / "aclImdb" / "test" / "neg" / "0_7.txt").unlink()
    (tmp_path / "aclImdb" / "test" / "neg" / "1_7.txt").unlink()
    with pytest.raises(LraDataError, match=r"test/neg: no \*\.txt reviews"):
        readers.prepare_text(tmp_path / "out2", tmp_path / "aclImdb")


def _write_cifar(root: Path, rng: np.random.Generator, sizes: dict[str, int]) -> dict:
    root.mkdir(parents=True)
    written = {}
    for name, n in sizes.items():
        batch = {
            b"batch_label": b"training batch",
            b"data": rng.integers(0, 256, (n, 3072), np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"filenames": [b"a.png"] * n,
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = batch
    return written


def test_cifar_reader_grey_levels(tmp_path):
    rng = np.random.default_rng(0)
    names = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    written = _write_cifar(tmp_path / "cifar-10-batches-py", rng, names)
    stats = readers.prepare_image(tmp_path / "out", tmp_path / "cifar-10-batches-py")
    assert stats["train"].examples == 15 and stats["test"].examples == 4
    test = open_split(tmp_path / "out", "test")
    batch = written["test_batch"]
    for i in range(4):
        pixels, label = test[i]
        rgb = batch[b"data"][i].reshape(3, 32, 32).astype(float)  # planes R, G, B, row-major
        luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        assert np.abs(pixels.reshape(32, 32) - luma).max() <= 0.5 + 1e-9  # rounded luma
        assert label == batch[b"labels"][i]
    white = readers.to_grey(np.full((1, 3072), 255, np.uint8))
    assert white.min() == white.max() == 255


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch HACKED",)


def test_cifar_reader_refuses_other_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(
        LraDataError, match=r"data_batch_1: the pickle asks for (posix|os|nt)\.system"
    ):
        readers.read_cifar_batch(path)
    assert not (tmp_path / "HACKED").exists()
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, 2))
    with pytest.raises(LraDataError, match=r"data_batch_1: not a CIFAR-10 python batch"):
        readers.read_cifar_batch(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(LraDataError, match=r"data_batch_1: unreadable"):
        readers.read_cifar_batch(path)
    with pytest.raises(LraDataError, match=r"missing; expected CIFAR-10"):
        (tmp_path / "test_batch").write_bytes(b"")
        readers.prepare_image(tmp_path / "out", tmp_path)


def test_aan_reader(tmp_path):
    rows = {
        "train": [("1.0", "a", "b", "first doc", "second doc"), ("0.0", "c", "d", "é" * 3000, "y")],
        "eval": [("0", "e", "f", "p", "q")],
        "test": [("1", "g", "h", "", "r")],
    }
    for name, lines in rows.items():
        text = "".join("\t".join(r) + "\n" for r in lines)
        (tmp_path / f"new_aan_pairs.{name}.tsv").write_text(text, encoding="utf-8")
    stats = readers.prepare_retrieval(tmp_path / "out", tmp_path)
    for split, name in (("train", "train"), ("valid", "eval"), ("test", "test")):
        data = open_split(tmp_path / "out", split)
        for i, row in enumerate(rows[name]):
            a, b, label = data.pair(i)
            assert (
                bytes(a.tolist()) == row[3].encode()[:4000] and bytes(b.tolist()) == row[4].encode()
            )
            assert label == int(float(row[0]))
    assert stats["train"].max_length == 4000 and stats["test"].min_length == 0
    (tmp_path / "new_aan_pairs.eval.tsv").write_text("1\ta\tb\tonly four\n", encoding="utf-8")
    with pytest.raises(LraDataError, match=r"eval.tsv:1: 4 tab-separated fields, expected 5"):
        readers.prepare_retrieval(tmp_path / "out2", tmp_path)
    (tmp_path / "new_aan_pairs.eval.tsv").write_text("2\ta\tb\tc\td\n", encoding="utf-8")
    with pytest.raises(LraDataError, match=r"eval.tsv:1: label b'2', expected 0 or 1"):
        readers.prepare_retrieval(tmp_path / "out3", tmp_path)
