"""Tokenizers: one interface, three kinds, each stored as one file inside the data folder.

| kind            | file             | what it is                                              |
|-----------------|------------------|---------------------------------------------------------|
| `word`          | `dict.txt`       | whitespace split + fairseq's dictionary format          |
| `sentencepiece` | `spm.model`      | SentencePiece unigram or BPE model                      |
| `bpe`           | `tokenizer.json` | Hugging Face `tokenizers` byte-level BPE (exact round trip) |
| `hf`            | `hf-tokenizer/`  | a transformers model's tokenizer (data.tokenizer: hf:PATH) |

Tokenizers fitted here share fairseq's special ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.
A line's ids never include the end-of-line token; binarization appends `eol_id` after every line.
`word` and `sentencepiece` end lines with `</s>` (id 2, as fairseq does); `bpe` ends them with the
token of the newline byte, so decoding a token stream gives back the text byte for byte.

    tok = load_tokenizer("data/wikitext-103-bin")     # the folder `sbtrain preprocess` wrote
    ids = tok.encode("The cat sat .")                 # list[int], no end-of-line
    tok.decode([*ids, tok.eol_id])                    # "The cat sat .\\n"
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import chain, repeat
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from sbtrain.errors import UserError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
PAD_TO_MULTIPLE = 8  # fairseq pads dictionaries so embedding tables are tensor-core friendly
MAX_SP_LINE_BYTES = 1 << 16  # sentencepiece skips longer training lines (its default is 4,192)


class Block(NamedTuple):
    """Token ids of a block of text lines, each line followed by the end-of-line id."""

    ids: np.ndarray  # (tokens,) uint32
    words: int  # whitespace-separated words in the text
    unk: int  # tokens replaced by unk_id (a literal "<unk>" in the text is not a replacement)


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set `vocab_size`, `eol_id`, `pad_id`, `unk_id` in `__init__`."""

    kind: ClassVar[str]  # the name in recipes and meta.json
    file_name: ClassVar[str]  # the file `save` writes inside a data folder
    vocab_size: int
    eol_id: int
    pad_id: int
    unk_id: int

    @abstractmethod
    def encode(self, line: str) -> list[int]:
        """Ids of one line of text (without its end-of-line token)."""

    @abstractmethod
    def decode_line(self, ids: Sequence[int]) -> str:
        """Text of the ids of one line (no end-of-line ids among them)."""

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text of any number of lines: each line encoded alone, each newline the
        end-of-line id, as binarization (and so the exported tokenizer.json) maps a text."""
        ids: list[int] = []
        for number, line in enumerate(text.split("\n")):
            if number:
                ids.append(self.eol_id)
            ids.extend(self.encode(line))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; each end-of-line id becomes a newline."""
        lines, line = [], []
        for i in ids:
            if i == self.eol_id:
                lines.append(self.decode_line(line))
                line = []
            else:
                line.append(int(i))
        lines.append(self.decode_line(line))
        return "\n".join(lines)

    @abstractmethod
    def encode_block(self, text: str) -> Block:
        """Encode a block of whole lines, each ending with "\\n" (the batched, fast path)."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer as `directory / file_name`; returns that path."""

    @classmethod
    @abstractmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a model file (ours or one made elsewhere in the same format)."""


# ---------------------------------------------------------------------------------------------
# word: fairseq dictionary


class WordTokenizer(Tokenizer):
    """Whitespace-split words looked up in a fairseq `dict.txt` (unknown words become `<unk>`).

    `dict.txt` holds one `word count` line per entry from id 4 on, most frequent first; the four
    specials (ids 0..3) are implied, as in fairseq. Literal special strings in the text (e.g. the
    `<unk>` of WikiText-103's .tokens files) map to their special ids, also as in fairseq.
    """

    kind = "word"
    file_name = "dict.txt"

    def __init__(self, words: Sequence[str], counts: Sequence[int]):
        self.symbols = [*SPECIALS, *words]
        self.counts = list(counts)
        self.index = {word: i for i, word in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols)
        self.eol_id, self.pad_id, self.unk_id = EOS_ID, PAD_ID, UNK_ID

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, int], vocab_size: int | None = None, min_count: int = 1
    ) -> WordTokenizer:
        """Most frequent words first (ties in code-point order, so the result never depends on
        how counting was split among workers), at most `vocab_size` entries with the specials,
        then padded with `madeupwordNNNN` entries (count 0) to a multiple of 8 like fairseq.
        """
        kept = [(w, c) for w, c in counts.items() if c >= min_count and w not in SPECIALS]
        kept.sort(key=lambda wc: (-wc[1], wc[0]))
        if vocab_size is not None:
            kept = kept[: max(vocab_size - len(SPECIALS), 0)]
        words = [w for w, _ in kept]
        taken = set(words)
        padding = (-(len(SPECIALS) + len(words))) % PAD_TO_MULTIPLE
        i = 0
        while padding:
            name = f"madeupword{i:04d}"
            i += 1
            if name not in taken:  # a real word of that name keeps its id; pad with the next name
                words.append(name)
                padding -= 1
        return cls(words, [c for _, c in kept] + [0] * (len(words) - len(kept)))

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        words, counts, seen = [], [], set(SPECIALS)
        # "\r", "\x85" etc. are whitespace inside lines of text, not line ends: split on "\n" only
        lines = _read_bytes(path).split(b"\n")
        for number, raw in enumerate(lines[:-1] if lines[-1] == b"" else lines, 1):
            try:
                word, _, count = raw.decode("utf-8").rpartition(" ")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not UTF-8; dict.txt files are UTF-8") from None
            if not word or not count.isdigit():
                raise UserError(f"{path}:{number}: expected 'word count' (fairseq's dict.txt)")
            if word in seen:
                raise UserError(f"{path}:{number}: {word!r} is listed twice or is a special")
            seen.add(word)
            words.append(word)
            counts.append(int(count))
        return cls(words, counts)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.file_name
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{w} {c}\n" for w, c in zip(self.symbols[len(SPECIALS) :], self.counts))
        return path

    def encode(self, line: str) -> list[int]:
        return [self.index.get(word, UNK_ID) for word in line.split()]

    def decode_line(self, ids: Sequence[int]) -> str:
        return " ".join(self.symbols[i] for i in ids)

    def encode_block(self, text: str) -> Block:
        # Unknown words first get an id no vocabulary reaches, so they can be told apart from a
        # literal "<unk>" in the text, then become <unk>. One C-level map per line into an
        # array keeps this at ~40 MB/s per process.
        unseen = np.iinfo(np.uint32).max
        buffer = array("I")  # C unsigned int: 4 bytes on every platform numpy supports
        get, unknown = self.index.get, repeat(unseen)
        for line in text.split("\n")[:-1]:
            buffer.extend(map(get, line.split(), unknown))
            buffer.append(EOS_ID)
        ids = np.frombuffer(buffer, dtype=np.uint32)
        replaced = ids == unseen
        unk = int(np.count_nonzero(replaced))
        if unk:
            ids[replaced] = UNK_ID
        return Block(ids, len(ids) - text.count("\n"), unk)


# ---------------------------------------------------------------------------------------------
# sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Decoding gives the text after SentencePiece's normalisation
    (NFKC, runs of whitespace collapsed to one space, no leading or trailing space, and its
    whitespace mark "▁" (U+2581) read as a space); characters outside the model decode as " ⁇ ".
    """

    kind = "sentencepiece"
    file_name = "spm.model"

    def __init__(self, model_proto: bytes, source: str = "<model>"):
        import sentencepiece

        self.model_proto = model_proto
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise UserError(f"{source}: not a sentencepiece model ({_one_line(e)})") from None
        if self.sp.eos_id() < 0:
            raise UserError(f"{source}: the model has no end-of-sentence piece to end lines with")
        self.vocab_size = self.sp.get_piece_size()
        self.eol_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eol_id
        self.unk_id = self.sp.unk_id()

    @classmethod
    def fit(
        cls, lines: Iterable[str], vocab_size: int, model_type: str = "unigram"
    ) -> SentencePieceTokenizer:
        """Train on `lines` (callers pass a bounded sample: training memory grows with it, about
        22 bytes per byte of text).

        The vocabulary size is a soft limit, so a small corpus gives a smaller model instead of an
        error. Specials take fairseq's ids 0..3.
        """
        import io

        import sentencepiece

        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                bos_id=BOS_ID,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                max_sentence_length=MAX_SP_LINE_BYTES,
                # One thread: the model then depends on the data alone (it changes with the
                # thread count), and on a shared 2-core machine 2 threads were 3x slower.
                num_threads=1,
                minloglevel=2,  # its per-step logging would bury our summary
            )
        except RuntimeError as e:
            raise UserError(
                f"sentencepiece could not fit a model ({_one_line(e)}); try another vocab_size"
            ) from None
        return cls(model.getvalue(), source="sentencepiece training")

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(_read_bytes(path), source=str(path))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.file_name
        path.write_bytes(self.model_proto)
        return path

    def encode(self, line: str) -> list[int]:
        return self.sp.encode(line)

    def decode_line(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_block(self, text: str) -> Block:
        lines = text.split("\n")[:-1]
        # One thread: binarization runs one process per core already.
        pieces = self.sp.encode(lines, num_threads=1)
        ids = _join_lines(pieces, self.eol_id)
        unk = int(np.count_nonzero(ids == self.unk_id))
        return Block(ids, count_words(text), unk)


# ---------------------------------------------------------------------------------------------
# bpe: Hugging Face tokenizers, byte level


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) from Hugging Face `tokenizers`: every string round-trips
    exactly. Lines end with the token of the newline byte. Literal special strings in the text
    ("<unk>", "</s>", ...) are kept as single special tokens and decode back to themselves.
    """

    kind = "bpe"
    file_name = "tokenizer.json"

    def __init__(self, tokenizer: object, source: str = "<tokenizer>"):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        newline = tokenizer.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            raise UserError(f"{source}: a newline is not one token, so lines cannot end with one")
        self.eol_id = newline[0]
        vocab = tokenizer.get_vocab()
        self.pad_id = vocab.get("<pad>", self.eol_id)
        self.unk_id = vocab.get("<unk>", -1)  # byte level needs none: -1 is an id never emitted
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        # An added "<unk>" is matched in the raw text itself; those matches were not replacements.
        self._literal_unk = "<unk>" if "<unk>" in added else None

    @classmethod
    def fit(cls, lines: Iterable[str], vocab_size: int) -> BpeTokenizer:
        """Train on `lines`; the specials take fairseq's ids 0..3, the 256 bytes come next."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = HFTokenizer(models.BPE())
        # No prefix space and no normaliser: both would break the exact round trip.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines, trainer)
        return cls(tokenizer, source="bpe training")

    @classmethod
    def from_file(cls, path: str | Path) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tokenizer = HFTokenizer.from_str(_read_bytes(path).decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            raise UserError(f"{path}: not a tokenizers JSON file ({_one_line(e)})") from None
        return cls(tokenizer, source=str(path))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.file_name
        self.tokenizer.save(str(path))
        return path

    def encode(self, line: str) -> list[int]:
        return self.tokenizer.encode(line, add_special_tokens=False).ids

    def decode_line(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_block(self, text: str) -> Block:
        lines = text.split("\n")[:-1]
        encodings = self.tokenizer.encode_batch_fast(lines, add_special_tokens=False)
        ids = _join_lines([e.ids for e in encodings], self.eol_id)
        unk = int(np.count_nonzero(ids == self.unk_id)) if self.unk_id >= 0 else 0
        if unk and self._literal_unk:
            unk -= text.count(self._literal_unk)
        return Block(ids, count_words(text), unk)


# ---------------------------------------------------------------------------------------------
# hf: a Hugging Face model's own tokenizer

HF_PREFIX = "hf:"  # data.tokenizer: hf:PATH loads the tokenizer of the model folder PATH
HF_INSTALL = "pip install 'sbtrain[hf]'"  # the extra with transformers and safetensors


class HFTokenizer(Tokenizer):
    """The tokenizer of a transformers model folder (AutoTokenizer, offline): the ids a Hugging
    Face model reads, for scoring it with `sbtrain eval-ppl hf:PATH`. Lines end with the newline's
    token when a newline is one token (GPT-2), else with the end-of-sequence token (Llama). Stored
    in the data folder as the tokenizer's own `save_pretrained` files.
    """

    kind = "hf"
    file_name = "hf-tokenizer"  # a folder

    def __init__(self, tokenizer: object, source: str = "<tokenizer>"):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1:
            self.eol_id = newline[0]
        elif tokenizer.eos_token_id is not None:
            self.eol_id = tokenizer.eos_token_id
        else:
            raise UserError(
                f"{source}: a newline is not one token and there is no end-of-sequence token "
                "to end lines with"
            )
        pad, unk = tokenizer.pad_token_id, tokenizer.unk_token_id
        self.pad_id = self.eol_id if pad is None else pad
        self.unk_id = -1 if unk is None else unk  # -1: an id never emitted

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load the tokenizer files of folder `path` (a model folder, or one `save` wrote)."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(f"hf tokenizers need transformers: {HF_INSTALL}") from None
        if not Path(path).is_dir():
            raise UserError(f"{path}: no such folder (hf:PATH names a model or tokenizer folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"{path}: no tokenizer transformers can load ({_one_line(e)})"
            ) from None
        return cls(tokenizer, source=str(path))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.file_name
        self.tokenizer.save_pretrained(str(path))
        return path

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, added tokens included (two tokenizers with equal ones encode alike)."""
        return self.tokenizer.get_vocab()

    def encode(self, line: str) -> list[int]:
        return self.tokenizer(line, add_special_tokens=False)["input_ids"]

    def decode_line(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_block(self, text: str) -> Block:
        lines = text.split("\n")[:-1]
        pieces = self.tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
        ids = _join_lines(pieces, self.eol_id)
        unk = int(np.count_nonzero(ids == self.unk_id)) if self.unk_id >= 0 else 0
        return Block(ids, count_words(text), unk)


# ---------------------------------------------------------------------------------------------
# loading

KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (WordTokenizer, SentencePieceTokenizer, BpeTokenizer, HFTokenizer)
}


def tokenizer_from_file(path: str | Path) -> Tokenizer:
    """Load a model file by its name: `*.model` sentencepiece, `*.json` tokenizers, else a
    fairseq `dict.txt`; `hf:FOLDER` (or a folder) a transformers tokenizer."""
    text = str(path)
    if text.startswith(HF_PREFIX) or Path(text).is_dir():
        return HFTokenizer.from_file(text.removeprefix(HF_PREFIX))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if path.suffix == ".json":
        return BpeTokenizer.from_file(path)
    return WordTokenizer.from_file(path)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a preprocessed folder (written by `sbtrain preprocess`)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found: {data_dir} is not a preprocessed data folder "
            "(run `sbtrain preprocess RECIPE` first, or set data.dir)"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; rerun `sbtrain preprocess --force`") from None


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a folder written by `sbtrain preprocess` (named in its meta.json)."""
    meta = read_meta(data_dir)
    kind = meta.get("tokenizer")
    if kind not in KINDS or "tokenizer_file" not in meta:
        raise UserError(
            f"{Path(data_dir) / 'meta.json'}: unknown tokenizer {kind!r}; "
            "rerun `sbtrain preprocess --force`"
        )
    return KINDS[kind].from_file(Path(data_dir) / meta["tokenizer_file"])


def count_words(text: str) -> int:
    """`len(text.split())` without creating the words: about twice as fast, which matters
    next to a subword encoder."""
    if not text:
        return 0
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    space = _whitespace_table()[code_points]
    return int(np.count_nonzero(space[:-1] & ~space[1:])) + int(not space[0])


@lru_cache(maxsize=1)
def _whitespace_table() -> np.ndarray:
    """`str.isspace` of every code point (1.1 MB, built once per process in ~0.05 s)."""
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    table[[i for i in range(sys.maxunicode + 1) if chr(i).isspace()]] = True
    return table


def _join_lines(lines: Sequence[Sequence[int]], eol_id: int) -> np.ndarray:
    """Concatenate per-line ids with `eol_id` after each line, as one uint32 array."""
    total = sum(map(len, lines)) + len(lines)
    with_eol = chain.from_iterable(chain(line, (eol_id,)) for line in lines)
    return np.fromiter(with_eol, dtype=np.uint32, count=total)


def _read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
