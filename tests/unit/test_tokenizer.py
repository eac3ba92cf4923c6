"""Tokenizers: dict.txt format, round trips, the batched path against the per-line one."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter

import numpy as np
import pytest
import sentencepiece

from sbtrain.errors import UserError
from sbtrain.tokenizer import (
    EOS_ID,
    SPECIALS,
    UNK_ID,
    BpeTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    count_words,
    load_tokenizer,
    tokenizer_from_file,
)

TEXT = [
    " = Valkyria Chronicles III = ",
    " ",
    "",
    " The game began development in 2010 , carrying over a large portion of the work .",
    "Tabs\tand  double  spaces, a no\u00a0break space and a\u2009thin one; CRLF ends\r",
    " It met with positive sales in Japan , and was praised by both Japanese and western critics .",
    "Accents: café, Zürich, naïve — and a literal <unk> in the text .",
]
# Strings no training text held: the subword round trips must cope with them too.
TRICKY = ["", " ", "  two  spaces  ", "tab\tcr\r", "é🙂 中文 \u00a0x", "a </s> <unk>b <s>"]
TRICKY += ["\x00\x85", "\u2581 lower block"]


def words_of(lines):
    return Counter(w for line in lines for w in line.split())


def corpus_lines(n=300):
    """TEXT repeated with numbered variations: enough for subword training, still instant."""
    return [f"{line} item{i % 37}" if line.strip() else line for i in range(n) for line in TEXT]


@pytest.fixture(scope="module")
def word():
    return WordTokenizer.from_counts(words_of(TEXT))


@pytest.fixture(scope="module")
def spm():
    return SentencePieceTokenizer.fit(corpus_lines(), vocab_size=300)


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.fit(corpus_lines(), vocab_size=400)


# ---------------------------------------------------------------------------------------------
# word


def test_word_vocabulary_order_threshold_cap_and_padding():
    counts = {"b": 5, "a": 5, "c": 9, "rare": 1, "<unk>": 7, "</s>": 3}
    tok = WordTokenizer.from_counts(counts, min_count=2)
    # specials first (never counted as words), then by count, ties in code-point order
    assert tok.symbols[:7] == [*SPECIALS, "c", "a", "b"]
    assert tok.vocab_size == 8 and tok.symbols[7] == "madeupword0000"
    capped = WordTokenizer.from_counts({f"w{i}": 100 - i for i in range(20)}, vocab_size=10)
    assert capped.symbols[4:10] == [f"w{i}" for i in range(6)]
    assert capped.vocab_size == 16 and capped.vocab_size % 8 == 0  # padded up, fairseq-style


def test_word_padding_skips_names_that_are_real_words():
    tok = WordTokenizer.from_counts({"madeupword0000": 2, "x": 1})
    assert tok.symbols[4:] == ["madeupword0000", "x", "madeupword0001", "madeupword0002"]
    assert len(set(tok.symbols)) == tok.vocab_size


def test_dict_txt_round_trip(tmp_path, word):
    path = word.save(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"{word.symbols[4]} {word.counts[0]}"  # `word count`, specials implied
    assert not any(line.split()[0] in SPECIALS for line in lines)
    again = tokenizer_from_file(path)
    assert isinstance(again, WordTokenizer)
    assert again.symbols == word.symbols and again.counts == word.counts
    assert (again.eol_id, again.pad_id, again.unk_id) == (2, 1, 3)


@pytest.mark.parametrize(
    "content, problem",
    [("the 5\nbad-line\n", "dict.txt:2: expected 'word count'"),
     ("the 5\nthe 3\n", "dict.txt:2: 'the' is listed twice"),
     ("<unk> 5\n", "dict.txt:1: '<unk>' is listed twice or is a special"),
     ("the x\n", "dict.txt:1: expected")],
)  # fmt: skip
def test_bad_dict_txt_is_a_user_error(tmp_path, content, problem):
    (tmp_path / "dict.txt").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=problem):
        tokenizer_from_file(tmp_path / "dict.txt")


def test_word_round_trip_up_to_unk_and_whitespace(word):
    for line in TEXT:
        assert word.decode(word.encode(line)) == " ".join(line.split())
    ids = word.encode("The unheard-of game")
    assert ids[1] == UNK_ID and word.decode(ids) == "The <unk> game"


def test_word_encode_block_matches_lines_and_counts_replacements(word):
    lines = [*TEXT, "brand new words here <unk> and <unk>", ""]
    block = word.encode_block("\n".join(lines) + "\n")
    expected = [i for line in lines for i in (*word.encode(line), EOS_ID)]
    assert block.ids.tolist() == expected
    assert block.words == sum(len(line.split()) for line in lines)
    # "brand new words here" are replacements; the literal "<unk>"s were unknown already
    assert block.unk == 4 == np.count_nonzero(block.ids == UNK_ID) - 3


def test_decode_turns_end_of_line_into_newline(word):
    ids = [*word.encode(TEXT[0]), EOS_ID, EOS_ID, *word.encode(TEXT[3]), EOS_ID]
    assert word.decode(ids) == " ".join(TEXT[0].split()) + "\n\n" + " ".join(TEXT[3].split()) + "\n"


# ---------------------------------------------------------------------------------------------
# sentencepiece


def test_sentencepiece_specials_follow_fairseq(spm):
    assert [spm.sp.id_to_piece(i) for i in range(4)] == list(SPECIALS)
    assert (spm.eol_id, spm.pad_id, spm.unk_id) == (2, 1, 3)
    assert 4 < spm.vocab_size <= 300  # a soft limit: a small corpus gives a smaller model


def test_sentencepiece_round_trip_up_to_normalisation(spm, tmp_path):
    raw = sentencepiece.SentencePieceProcessor(model_file=str(spm.save(tmp_path)))
    checked = 0
    for line in [*TEXT, *TRICKY]:
        ids = spm.encode(line)
        if spm.unk_id in ids:  # characters the model never saw decode as " ⁇ "
            continue
        checked += 1
        # its normalisation: NFKC, whitespace runs collapsed, ends stripped, and its whitespace
        # mark "▁" (U+2581) in the text read as a space
        normalised = raw.normalize(line).replace("\u2581", " ").strip()
        assert spm.decode(ids) == normalised
        nfkc = unicodedata.normalize("NFKC", line.replace("\u2581", " "))
        assert normalised == " ".join(nfkc.split())
    assert checked >= len(TEXT)


def test_sentencepiece_file_round_trip_and_block(spm, tmp_path):
    again = tokenizer_from_file(spm.save(tmp_path))
    assert isinstance(again, SentencePieceTokenizer)
    lines = [*TEXT, *TRICKY[:-1]]
    block = again.encode_block("\n".join(lines) + "\n")
    assert block.ids.tolist() == [i for line in lines for i in (*spm.encode(line), spm.eol_id)]
    assert block.unk == int(np.count_nonzero(block.ids == spm.unk_id))
    assert block.words == sum(len(line.split()) for line in lines)


def test_sentencepiece_bpe_model_type():
    tok = SentencePieceTokenizer.fit(corpus_lines(100), vocab_size=200, model_type="bpe")
    assert tok.sp.id_to_piece(2) == "</s>" and tok.eol_id == 2
    line = TEXT[3]
    assert tok.decode(tok.encode(line)) == " ".join(line.split())


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "x.model").write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match=r"x\.model: not a sentencepiece model"):
        tokenizer_from_file(tmp_path / "x.model")


# ---------------------------------------------------------------------------------------------
# bpe


def test_bpe_round_trip_is_exact(bpe):
    for line in [*TEXT, *TRICKY]:
        assert bpe.decode(bpe.encode(line)) == line


def test_bpe_stream_decodes_to_the_text_and_ends_lines_with_newline(bpe, tmp_path):
    lines = [*TEXT, *TRICKY]
    text = "\n".join(lines) + "\n"
    block = tokenizer_from_file(bpe.save(tmp_path)).encode_block(text)
    assert bpe.decode(block.ids.tolist()) == text
    assert bpe.encode("\n") == [bpe.eol_id] and bpe.eol_id not in (0, 1, 2, 3)
    assert block.unk == 0  # bytes need no <unk>; the literal "<unk>"s are not replacements
    assert bpe.tokenizer.id_to_token(3) == "<unk>" and bpe.pad_id == 1


def test_bpe_specials_and_bad_file(bpe, tmp_path):
    assert [bpe.tokenizer.id_to_token(i) for i in range(4)] == list(SPECIALS)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(UserError, match=r"tokenizer\.json: not a tokenizers JSON file"):
        tokenizer_from_file(tmp_path / "tokenizer.json")


def test_count_words_is_str_split():
    for text in [*TEXT, *TRICKY, "\x1c\x1dx\x1e", "a\u3000b\u2028c\u0085d", "\ud800 lone"]:
        assert count_words(text) == len(text.split()), repr(text)


# ---------------------------------------------------------------------------------------------
# loading


def test_load_tokenizer_needs_a_preprocessed_folder(tmp_path):
    with pytest.raises(UserError, match=r"meta\.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "meta.json").write_text('{"tokenizer": "morse", "tokenizer_file": "x"}')
    with pytest.raises(UserError, match="unknown tokenizer 'morse'"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="tokenizer file not found"):
        tokenizer_from_file(tmp_path / "missing.model")
