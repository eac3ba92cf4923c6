"""`sbtrain preprocess`: counts checked against an independent count of the raw text, output
format, worker invariance, and every bad input ending in one line, exit 2, nothing half-written."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from sbtrain import binarize
from sbtrain.binarize import FORMAT, line_ranges, sample_lines, token_dtype
from sbtrain.tokenizer import SPECIALS, WordTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WIKI_LEADS = ROOT.parent / "shared" / "corpora" / "wiki-leads"
PREPARE = ROOT / "data" / "prepare-wikitext-103.sh"
needs_wiki_leads = pytest.mark.skipif(
    not WIKI_LEADS.is_dir(), reason=f"real corpus {WIKI_LEADS} not present"
)


# ---------------------------------------------------------------------------------------------
# a generated corpus and an independent count of it


def generated_text(rng: random.Random, n_lines: int, vocab: list[str]) -> str:
    """WikiText-like lines with the awkward cases: truly empty lines, " " lines, tabs, no-break
    and thin spaces, CRLF, a literal <unk>, non-ASCII words."""
    lines = []
    for i in range(n_lines):
        kind = i % 7
        if kind == 0:
            lines.append(f" = {rng.choice(vocab).title()} = ")
        elif kind == 1:
            lines.append(" ")
        elif kind == 2:
            lines.append("")
        else:
            words = rng.choices(vocab, weights=[1 / (r + 1) for r in range(len(vocab))], k=40)
            seps = rng.choices([" ", " ", " ", "  ", "\t", "\u00a0", "\u2009"], k=len(words))
            line = "".join(s + w for s, w in zip(seps, words))
            lines.append(line + ("\r" if kind == 3 else ""))
    return "\n".join(lines) + "\n"


def make_corpus(folder: Path, seed: int = 0, ext: str = "raw", final_newline=True) -> Path:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)] + ["café", "Zürich", "<unk>", "naïve", "—"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_lines, extra in (("train", 700, []), ("valid", 120, ["new1", "new2", "newé"])):
        text = generated_text(rng, n_lines, vocab + extra)
        (folder / f"wiki.{split}.{ext}").write_text(text, encoding="utf-8", newline="")
    test = generated_text(rng, 90, [*vocab[::3], "unseen"])
    (folder / f"wiki.test.{ext}").write_text(
        test if final_newline else test.rstrip("\n"), encoding="utf-8", newline=""
    )
    return folder


def raw_lines(path: Path) -> list[str]:
    """Lines as the format defines them: split on "\\n" only, a last line without one counts."""
    lines = path.read_bytes().decode("utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def word_counts(path: Path) -> Counter:
    return Counter(w for line in raw_lines(path) for w in line.split())


def run_preprocess(raw: Path, dest: Path, *args: str) -> int:
    return main(["preprocess", f"data.raw={raw}", f"data.dir={dest}", *args])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders a run left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "raw", final_newline=False)


# ---------------------------------------------------------------------------------------------
# word level: counts, format, stats


def test_word_counts_match_an_independent_count(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(binarize, "BLOCK_BYTES", 1000)  # many blocks: their seams are tested
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest) == 0
    meta = read_json(dest / "meta.json")
    assert meta == {
        "format": FORMAT, "tokenizer": "word", "tokenizer_file": "dict.txt",
        "vocab_size": meta["vocab_size"], "dtype": "uint16", "eol_id": 2, "pad_id": 1,
        "unk_id": 3, "splits": ["train", "valid", "test"],
    }  # fmt: skip
    assert meta["vocab_size"] % 8 == 0
    for split in meta["splits"]:
        source = corpus / f"wiki.{split}.raw"
        lines = raw_lines(source)
        words = sum(len(line.split()) for line in lines)
        stats = read_json(dest / f"{split}.json")
        assert list(stats) == ["tokens", "lines", "words", "unk", "unk_rate", "bytes"]
        assert stats["lines"] == len(lines)
        assert stats["words"] == words
        assert stats["tokens"] == words + len(lines)  # one end-of-line per line, empty ones too
        assert stats["bytes"] == source.stat().st_size
        ids = np.memmap(dest / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == stats["tokens"] and np.count_nonzero(ids == 2) == len(lines)
        assert stats["unk_rate"] == pytest.approx(stats["unk"] / stats["tokens"])


def test_bin_holds_each_line_encoded_then_end_of_line(corpus, tmp_path):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest) == 0
    tok = load_tokenizer(dest)
    assert isinstance(tok, WordTokenizer)
    for split in ("valid", "test"):
        lines = raw_lines(corpus / f"wiki.{split}.raw")
        expected = [i for line in lines for i in (*tok.encode(line), tok.eol_id)]
        assert np.fromfile(dest / f"{split}.bin", dtype="<u2").tolist() == expected
        known = set(tok.symbols)
        lines = [" ".join(w if w in known else "<unk>" for w in line.split()) for line in lines]
        assert tok.decode(expected) == "".join(line + "\n" for line in lines)


@pytest.mark.parametrize("min_count", [1, 3])
def test_unknown_counts_match_an_independent_count(corpus, tmp_path, min_count):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest, f"data.min_count={min_count}") == 0
    train = word_counts(corpus / "wiki.train.raw")
    known = {w for w, c in train.items() if c >= min_count} | set(SPECIALS)
    for split in ("valid", "test"):
        words = word_counts(corpus / f"wiki.{split}.raw")
        # replaced: unknown words, but not a literal "<unk>" (already unknown in the source)
        expected = sum(c for w, c in words.items() if w not in known)
        assert read_json(dest / f"{split}.json")["unk"] == expected > 0
    assert read_json(dest / "train.json")["unk"] == sum(
        c for w, c in train.items() if w not in known
    )


def test_dict_txt_lists_the_train_words_by_count(corpus, tmp_path):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest) == 0
    entries = [line.rsplit(" ", 1) for line in (dest / "dict.txt").read_text("utf-8").splitlines()]
    listed = {w: int(c) for w, c in entries if not w.startswith("madeupword")}
    train = word_counts(corpus / "wiki.train.raw")
    assert listed == {w: c for w, c in train.items() if w not in SPECIALS}
    assert [int(c) for _, c in entries] == sorted((int(c) for _, c in entries), reverse=True)


@pytest.mark.parametrize("kind", ["word", "sentencepiece"])
def test_workers_give_byte_identical_output(corpus, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(binarize, "TASK_BYTES", 4096)  # many ranges per split
    outputs = []
    for workers in (1, 2):
        dest = tmp_path / f"bin{workers}"
        assert (
            run_preprocess(corpus, dest, f"data.workers={workers}", f"data.tokenizer={kind}") == 0
        )
        outputs.append({p.name: p.read_bytes() for p in dest.iterdir()})
    assert outputs[0] == outputs[1]


@needs_wiki_leads
def test_wiki_leads_counts_two_workers(tmp_path):
    dest = tmp_path / "bin"
    assert run_preprocess(WIKI_LEADS, dest, "data.workers=2") == 0
    train_vocab = set(word_counts(WIKI_LEADS / "wiki.train.raw")) | set(SPECIALS)
    golden = {"train": 800_916, "valid": 27_060, "test": 26_032}  # words + lines
    for split, tokens in golden.items():
        lines = raw_lines(WIKI_LEADS / f"wiki.{split}.raw")
        stats = read_json(dest / f"{split}.json")
        assert stats["tokens"] == sum(len(line.split()) for line in lines) + len(lines) == tokens
        words = word_counts(WIKI_LEADS / f"wiki.{split}.raw")
        assert stats["unk"] == sum(c for w, c in words.items() if w not in train_vocab)
    assert read_json(dest / "meta.json")["dtype"] == "uint32"  # 83,112 types


def test_tokens_files_are_preferred_to_raw(corpus, tmp_path, capsys):
    both = make_corpus(tmp_path / "both", seed=1, ext="tokens")
    for split in ("train", "valid", "test"):
        (both / f"wiki.{split}.raw").write_bytes((corpus / f"wiki.{split}.raw").read_bytes())
    assert run_preprocess(both, tmp_path / "bin") == 0
    assert "| [test] wiki.test.tokens: 90 lines," in capsys.readouterr().out
    assert read_json(tmp_path / "bin" / "test.json")["bytes"] == (
        (both / "wiki.test.tokens").stat().st_size
    )


def test_fairseq_flags_without_a_recipe(corpus, tmp_path):
    dest = tmp_path / "bin"
    train, valid = str(corpus / "wiki.train.raw"), str(corpus / "wiki.valid.raw")
    args = ["--trainpref", train, "--validpref", valid, "--destdir", str(dest), "--vocab-size=50"]
    assert main(["preprocess", *args]) == 0
    assert read_json(dest / "meta.json")["splits"] == ["train", "valid"]
    assert read_json(dest / "meta.json")["vocab_size"] == 56  # 50, padded to a multiple of 8
    # An existing dictionary is reused as is, through the plain encoding path: the same bytes
    # as the one-pass fit-and-encode of train (many <unk>s here, with the cap).
    again = tmp_path / "again"
    assert main(["preprocess", *args[:4], "--destdir", str(again), "--srcdict",
                 str(dest / "dict.txt")]) == 0  # fmt: skip
    for name in ("train.bin", "train.json", "valid.bin", "valid.json", "dict.txt"):
        assert (again / name).read_bytes() == (dest / name).read_bytes(), name
    assert read_json(dest / "train.json")["unk"] > 0


# ---------------------------------------------------------------------------------------------
# subword tokenizers


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_subword_preprocess(corpus, tmp_path, kind):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest, f"data.tokenizer={kind}", "data.vocab_size=400") == 0
    meta = read_json(dest / "meta.json")
    tok = load_tokenizer(dest)
    assert (meta["tokenizer"], meta["tokenizer_file"]) == (kind, tok.file_name)
    for split in ("valid", "test"):
        lines = raw_lines(corpus / f"wiki.{split}.raw")
        ids = np.fromfile(dest / f"{split}.bin", dtype="<u2")
        assert ids.tolist() == [i for line in lines for i in (*tok.encode(line), tok.eol_id)]
        stats = read_json(dest / f"{split}.json")
        assert stats["words"] == sum(len(line.split()) for line in lines)
        if kind == "bpe":  # exact: the token stream decodes to the file
            assert tok.decode(ids.tolist()) == "\n".join(lines) + "\n"
            assert stats["unk"] == 0
    again = tmp_path / "again"
    model = str(dest / tok.file_name)
    assert run_preprocess(corpus, again, "--tokenizer-model", model) == 0
    assert (again / "test.bin").read_bytes() == (dest / "test.bin").read_bytes()


def test_subword_sample_is_whole_lines_within_budget(corpus, tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i} " + "x" * (i % 50) for i in range(5000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sample = sample_lines(path, budget=20_000, windows=16)
    assert set(sample) <= set(lines)
    assert 10_000 < sum(len(s) + 1 for s in sample) <= 20_000
    assert sample_lines(corpus / "wiki.valid.raw", 10**9) == raw_lines(corpus / "wiki.valid.raw")


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written, nothing existing destroyed


def assert_refused(capsys, status: int, *phrases: str) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("sbtrain preprocess: error: "), err
    for phrase in phrases:
        assert phrase in err, err
    return err


def test_missing_split(corpus, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid"):
        (raw / f"wiki.{split}.raw").write_bytes((corpus / f"wiki.{split}.raw").read_bytes())
    assert_refused(capsys, run_preprocess(raw, tmp_path / "bin"), "no wiki.test.tokens")
    assert not (tmp_path / "bin").exists() and leftovers(tmp_path) == []


def test_empty_train_split(corpus, tmp_path, capsys):
    raw = make_corpus(tmp_path / "raw")
    (raw / "wiki.train.raw").write_bytes(b"")
    assert_refused(capsys, run_preprocess(raw, tmp_path / "bin"), "train split is empty")
    (raw / "wiki.train.raw").write_bytes(b" \n\n \t\n")
    assert_refused(capsys, run_preprocess(raw, tmp_path / "bin"), "holds no words")
    assert not (tmp_path / "bin").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("split, workers", [("train", 1), ("valid", 1), ("valid", 2)])
def test_non_utf8_names_file_and_byte_offset(tmp_path, capsys, monkeypatch, split, workers):
    monkeypatch.setattr(binarize, "BLOCK_BYTES", 1000)  # the bad byte lies in a later block
    raw = make_corpus(tmp_path / "raw")
    good = (raw / f"wiki.{split}.raw").read_bytes()
    offset = good.index(b"\n", 5000) + 3
    (raw / f"wiki.{split}.raw").write_bytes(good[:offset] + b"\xff" + good[offset:])
    status = run_preprocess(raw, tmp_path / "bin", f"data.workers={workers}")
    assert_refused(capsys, status, f"wiki.{split}.raw: not UTF-8 at byte {offset} ")
    assert not (tmp_path / "bin").exists() and leftovers(tmp_path) == []


def test_existing_output_is_refused_unless_force(corpus, tmp_path, capsys):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest, "data.vocab_size=20") == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert_refused(capsys, run_preprocess(corpus, dest), "output folder exists", "--force")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert run_preprocess(corpus, dest, "--force") == 0
    assert read_json(dest / "meta.json")["vocab_size"] > 20 and leftovers(tmp_path) == []


def test_force_replaces_only_our_own_output(corpus, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert_refused(capsys, run_preprocess(corpus, mine, "--force"), "only replaces a folder")
    assert (mine / "thesis.tex").read_text() == "precious"
    inside = make_corpus(tmp_path / "bin" / "raw")
    (tmp_path / "bin" / "meta.json").write_text(json.dumps({"format": FORMAT}))
    assert_refused(capsys, run_preprocess(inside, tmp_path / "bin", "--force"), "inside data.dir")
    assert (inside / "wiki.train.raw").is_file()


def test_vocabulary_too_large_for_uint32(corpus, tmp_path, capsys, monkeypatch):
    huge = WordTokenizer.from_counts({"a": 1})
    huge.vocab_size = 2**32 + 1
    monkeypatch.setattr(WordTokenizer, "from_counts", classmethod(lambda cls, *a, **k: huge))
    status = run_preprocess(corpus, tmp_path / "bin")
    assert_refused(capsys, status, "4294967297 entries does not fit uint32")
    assert not (tmp_path / "bin").exists() and leftovers(tmp_path) == []
    # a subword target that could never fit fails before any training
    status = run_preprocess(corpus, tmp_path / "bin", "--tokenizer=bpe", "--vocab-size=5000000000")
    assert_refused(capsys, status, "does not fit uint32")


def test_token_dtype_bounds():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    assert token_dtype(2**32) == "uint32"


def test_unknown_tokenizer_name(corpus, tmp_path, capsys):
    status = run_preprocess(corpus, tmp_path / "bin", "data.tokenizer=wordpiece")
    assert_refused(capsys, status, "'wordpiece' is none of word | sentencepiece | bpe")


def test_interrupted_run_keeps_the_old_output(corpus, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "bin"
    assert run_preprocess(corpus, dest) == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    encode = binarize._encode_range

    def interrupted(task):
        if "valid" in task.part_file:
            raise KeyboardInterrupt
        return encode(task)

    monkeypatch.setattr(binarize, "_encode_range", interrupted)
    assert run_preprocess(corpus, dest, "data.min_count=2", "--force") == 130
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_sigterm_removes_the_unfinished_output(corpus, tmp_path, monkeypatch):
    encode = binarize._encode_range

    def terminated(task):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, in the middle of the work
        return encode(task)

    monkeypatch.setattr(binarize, "_encode_range", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert run_preprocess(corpus, tmp_path / "bin") == 128 + signal.SIGTERM
    assert not (tmp_path / "bin").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


# ---------------------------------------------------------------------------------------------
# byte ranges


def test_line_ranges_cover_the_file_and_start_lines(tmp_path):
    rng = random.Random(0)
    for case in range(20):
        lines = ["x" * rng.choice([0, 1, 5, 300]) for _ in range(rng.randint(1, 40))]
        data = "\n".join(lines).encode() + (b"\n" if case % 2 else b"")
        path = tmp_path / f"f{case}"
        path.write_bytes(data)
        ranges = line_ranges(path, rng.randint(1, 12))
        assert ranges[0].start == 0 and ranges[-1].end == len(data)
        assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
        assert all(r.start < r.end and data[r.start - 1 : r.start] in (b"", b"\n") for r in ranges)


# ---------------------------------------------------------------------------------------------
# data/prepare-wikitext-103.sh


def fake_zip(path: Path, folder: str, suffix: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"{folder}/wiki.{split}.{suffix}", f" \n = {split} = \n \n text .\n")
    return path


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PREPARE), *args], capture_output=True, text=True)


def test_prepare_script(tmp_path):
    usage = prepare()
    assert usage.returncode == 2 and "wikitext-103-v1.zip" in usage.stdout + usage.stderr
    dest = tmp_path / "wikitext-103"
    archive = fake_zip(tmp_path / "wikitext-103-v1.zip", "wikitext-103", "tokens")
    done = prepare(str(archive), str(dest))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == [
        "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"
    ]  # fmt: skip
    assert "sbtrain preprocess" in done.stdout
    raw = prepare(str(fake_zip(tmp_path / "r.zip", "wikitext-103-raw", "raw")), str(dest))
    assert raw.returncode == 0 and (dest / "wiki.train.raw").is_file()
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("something/else.txt", "hi")
    wrong = prepare(str(tmp_path / "other.zip"), str(tmp_path / "w"))
    assert wrong.returncode == 2 and "not a WikiText-103 archive" in wrong.stderr
    assert not (tmp_path / "w").exists()
    missing = prepare(str(tmp_path / "nope.zip"), str(tmp_path / "w"))
    assert missing.returncode == 2 and "not found" in missing.stderr
