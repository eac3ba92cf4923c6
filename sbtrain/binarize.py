"""Raw text splits -> a tokenizer and binarized token ids, streamed with bounded memory.

    stats = preprocess(recipe.data)                       # reads data.raw, writes data.dir
    stats = preprocess(data, inputs={"train": "my.txt"})  # fairseq's --trainpref, per split

A line is the bytes up to a "\\n" (a last line without one counts too); every line, empty ones
included, gets one end-of-line token, as fairseq and Transformer-XL count WikiText-103.

Output folder (format "sbtrain-bin-1", see data/README.md):
    {split}.bin   token ids, little-endian uint16 (vocab <= 65536) or uint32, no header
    {split}.json  {"tokens", "lines", "words", "unk", "unk_rate", "bytes"}
    meta.json     {"format", "tokenizer", "tokenizer_file", "vocab_size", "dtype",
                   "eol_id", "pad_id", "unk_id", "splits"}
    dict.txt | spm.model | tokenizer.json

Files are cut into byte ranges on line boundaries; worker processes decode and encode their
ranges block by block and each writes its own part file, which is appended to `{split}.bin` in
order. A word vocabulary is fitted in the same pass that encodes train (see `_fit_word`).
Everything is written to a hidden folder beside `data.dir` that replaces it only once complete,
so a failed or interrupted run leaves the previous output as it was.
"""

from __future__ import annotations

import math
import os
import shutil
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from itertools import pairwise, repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from sbtrain.config import TextDataConfig
from sbtrain.errors import UserError
from sbtrain.staging import Imap, check_target, sigterm_as_exit, staging, worker_map, write_json
from sbtrain.tokenizer import (
    EOS_ID,
    HF_PREFIX,
    KINDS,
    SPECIALS,
    UNK_ID,
    BpeTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_file,
)

FORMAT = "sbtrain-bin-1"
SPLITS = ("train", "valid", "test")
BLOCK_BYTES = 4 << 20  # text decoded and tokenized at once: bounds a worker's memory (~60 MB)
TASK_BYTES = 64 << 20  # byte range per task: balances the workers and paces the progress bar
SAMPLE_WINDOWS = 256  # evenly spaced windows a subword tokenizer's training sample is cut from
DEFAULT_SUBWORD_VOCAB = 32_000
COPY_BYTES = 16 << 20


@dataclass(frozen=True)
class SplitStats:
    """Counts of one split (or of a range of it: ranges add up)."""

    tokens: int = 0  # ids written, end-of-line tokens included
    lines: int = 0
    words: int = 0  # whitespace-separated words of the raw text
    unk: int = 0  # words or pieces the tokenizer replaced by <unk>
    bytes: int = 0  # bytes of raw text read

    def __add__(self, other: SplitStats) -> SplitStats:
        return SplitStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @property
    def unk_rate(self) -> float:
        """Fraction of tokens that are replacements (fairseq's "% replaced by <unk>")."""
        return self.unk / self.tokens if self.tokens else 0.0

    def to_json(self) -> dict[str, int | float]:
        s = self
        return {"tokens": s.tokens, "lines": s.lines, "words": s.words, "unk": s.unk,
                "unk_rate": s.unk_rate, "bytes": s.bytes}  # fmt: skip


class Range(NamedTuple):
    """Bytes [start, end) of a file, starting and ending on line boundaries."""

    path: str
    start: int
    end: int


class EncodeTask(NamedTuple):
    range: Range
    tokenizer_file: str
    part_file: str  # where the worker writes the range's ids
    dtype: str


class IndexTask(NamedTuple):
    range: Range
    part_file: str  # where the worker writes the range's provisional word ids


class FirstSeen(dict):
    """word -> provisional id, new words numbered as they come: `map(d.__getitem__, words)`
    assigns and looks up at C speed, calling Python only for a new word."""

    def __missing__(self, word: str) -> int:
        self[word] = len(self)
        return self[word]


EOL_KEY = ""  # provisional id 0 = end of line: str.split() never yields an empty word


def preprocess(
    data: TextDataConfig,
    inputs: Mapping[str, str | Path | None] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, SplitStats]:
    """Fit (or load) the tokenizer and binarize every split into `data.dir`.

    `inputs` maps a split to its file and overrides `data.raw` for that split (fairseq's
    --trainpref/--validpref/--testpref). An existing `data.dir` is refused unless `force`; even
    then it is replaced only after the new folder is complete. Raises UserError on bad input.
    With `data.workers` > 1 the workers are spawned processes, which import the caller's main
    module: call this from under `if __name__ == "__main__":` in a script.
    """
    _check_options(data)
    sources = find_splits(data.raw, inputs or {})
    target = Path(os.path.abspath(data.dir))
    check_target(target, sources, force)
    with sigterm_as_exit(), staging(target, force) as out, worker_map(data.workers) as imap:
        tokenizer, stats = _obtain_tokenizer(data, sources, out, imap, log)
        dtype = token_dtype(tokenizer.vocab_size)
        tokenizer_file = tokenizer.save(out)
        for split, source in sources.items():
            if split not in stats:  # train may be binarized already, while fitting
                bin_path = out / f"{split}.bin"
                stats[split] = _binarize(
                    imap, source, tokenizer_file, bin_path, dtype, data.workers
                )
            write_json(out / f"{split}.json", stats[split].to_json())
            s = stats[split]
            log(
                f"| [{split}] {source.name}: {s.lines} lines, {s.tokens} tokens, "
                f"{100 * s.unk_rate:.3}% replaced by <unk>"
            )
        write_json(out / "meta.json", _meta(tokenizer, tokenizer_file, dtype, list(stats)))
    log(f"| wrote {data.dir}")
    return stats


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype holding ids below `vocab_size`."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise UserError(
        f"a vocabulary of {vocab_size} entries does not fit uint32 ids; use a smaller one"
    )


def find_splits(raw: str | None, inputs: Mapping[str, str | Path | None]) -> dict[str, Path]:
    """Input file of each split: `inputs[split]` where given, else from the `raw` folder
    (`wiki.{split}.tokens`, or `wiki.{split}.raw` when there is no .tokens file)."""
    sources = {}
    for split in SPLITS:
        if inputs.get(split):
            sources[split] = Path(inputs[split])
        elif raw is not None:
            sources[split] = _wikitext_file(Path(raw), split)
    if not sources:
        raise UserError(
            "no input: set data.raw to a folder with wiki.{train,valid,test}.{tokens,raw} "
            "or give --trainpref/--validpref/--testpref"
        )
    for split, path in sources.items():
        if not path.is_file():
            raise UserError(f"{path}: {split} file not found")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the {split} split is empty")
    return sources


def line_ranges(path: str | Path, parts: int) -> list[Range]:
    """Cut a file into at most `parts` ranges of about equal size, each ending after a "\\n"."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, parts):
            f.seek(max(size * i // parts - 1, 0))
            f.readline()  # to the start of the next line
            if cuts[-1] < f.tell() < size:
                cuts.append(f.tell())
    cuts.append(size)
    return [Range(str(path), a, b) for a, b in pairwise(cuts)]


def sample_lines(path: str | Path, budget: int, windows: int = SAMPLE_WINDOWS) -> list[str]:
    """About `budget` bytes of whole lines from `windows` evenly spaced places in the file (the
    whole file when it is smaller): a bounded, representative sample to fit a tokenizer on."""
    size = os.path.getsize(path)
    if size <= budget:
        return [line for text in _read_blocks(Range(str(path), 0, size)) for line in _lines(text)]
    lines = []
    with open(path, "rb") as f:
        for i in range(windows):
            f.seek(size * i // windows)
            if i:
                f.readline()  # skip the partial line
            start = f.tell()
            data = f.read(budget // windows)
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            lines.extend(_lines(_decode(data, path, start)))
    return lines


# ---------------------------------------------------------------------------------------------
# steps


def _check_options(data: TextDataConfig) -> None:
    if data.vocab_size is not None and data.vocab_size <= len(SPECIALS):
        raise UserError(
            f"data.vocab_size must exceed the {len(SPECIALS)} specials, got {data.vocab_size}"
        )
    if data.min_count < 1:
        raise UserError(f"data.min_count must be at least 1, got {data.min_count}")
    if data.tokenizer_sample_mb <= 0:
        raise UserError(
            f"data.tokenizer_sample_mb must be positive, got {data.tokenizer_sample_mb}"
        )


def _obtain_tokenizer(
    data: TextDataConfig, sources: dict[str, Path], staging: Path, imap: Imap, log: Callable
) -> tuple[Tokenizer, dict[str, SplitStats]]:
    """Load `data.tokenizer` when it names a file, else fit that kind on the train split.

    Returns the tokenizer and the stats of splits already binarized into `staging` (train,
    when a word vocabulary was fitted)."""
    kind = data.tokenizer
    if kind == HFTokenizer.kind:
        raise UserError("data.tokenizer: hf names no model; give its folder: hf:PATH")
    fitted = [k for k in KINDS if k != HFTokenizer.kind]
    if kind not in KINDS:
        if not Path(kind).is_file() and not kind.startswith(HF_PREFIX):
            raise UserError(
                f"data.tokenizer: {kind!r} is none of {' | '.join(fitted)} nor a model file "
                "nor hf:PATH (a transformers model folder)"
            )
        tokenizer = tokenizer_from_file(kind)
        log(f"| {tokenizer.kind} tokenizer from {kind}: {tokenizer.vocab_size} types")
        return tokenizer, {}
    if "train" not in sources:
        raise UserError(
            f"fitting a {kind} tokenizer needs a train split (data.raw or --trainpref), "
            "or pass an existing model with --tokenizer-model/--srcdict"
        )
    train, done = sources["train"], {}
    if kind == "word":
        tokenizer, done["train"] = _fit_word(imap, train, staging / "train.bin", data)
    else:
        vocab_size = data.vocab_size or DEFAULT_SUBWORD_VOCAB
        token_dtype(vocab_size)  # fail before a long training, not after
        lines = sample_lines(train, int(data.tokenizer_sample_mb * 1e6))
        megabytes = sum(map(len, lines)) / 1e6  # characters: close enough to bytes for a log
        log(f"| fitting {kind} on {len(lines)} lines ({megabytes:.1f} MB) of {train}")
        if kind == "sentencepiece":
            tokenizer = SentencePieceTokenizer.fit(lines, vocab_size, data.spm_model_type)
        else:
            tokenizer = BpeTokenizer.fit(lines, vocab_size)
    log(f"| {kind} tokenizer fitted on {train}: {tokenizer.vocab_size} types")
    return tokenizer, done


def _fit_word(
    imap: Imap, train: Path, bin_path: Path, data: TextDataConfig
) -> tuple[WordTokenizer, SplitStats]:
    """Word vocabulary and train ids from one pass over the text.

    Workers number words as they first see them, write those provisional ids and return their
    words and counts; here the parts' numbering is merged into one, the vocabulary is built from
    the total counts, and each part's ids are mapped to final ids with one table lookup. This
    replaces a second tokenizing pass over train (the slow part) with a numpy gather.
    """
    ranges = line_ranges(train, _parts(train, data.workers))
    tasks = [IndexTask(r, f"{bin_path}.part{i:05d}") for i, r in enumerate(ranges)]
    index, counts = FirstSeen({EOL_KEY: 0}), np.zeros(1, np.int64)
    to_global, stats = [], SplitStats()  # per part: its provisional ids -> ours
    with _progress(train, f"count+encode {train.name}") as bar:
        for words, part_counts, part_stats in imap(_index_range, tasks):
            ids = np.fromiter(map(index.__getitem__, words), np.int64, len(words))
            counts = np.concatenate([counts, np.zeros(len(index) - len(counts), np.int64)])
            counts[ids] += part_counts  # ids are distinct within a part
            to_global.append(ids)
            stats += part_stats
            bar.update(part_stats.bytes)
    words = list(index)
    if len(words) == 1:
        raise UserError(f"{train}: the train split holds no words to build a vocabulary from")
    tokenizer = WordTokenizer.from_counts(
        dict(zip(words[1:], counts[1:].tolist())), data.vocab_size, data.min_count
    )
    final = np.fromiter(map(tokenizer.index.get, words, repeat(UNK_ID)), np.int64, len(words))
    final[0] = EOS_ID
    replaced = final == UNK_ID
    if "<unk>" in index:  # a literal <unk> in the text is no replacement
        replaced[index["<unk>"]] = False
    dtype = np.dtype(token_dtype(tokenizer.vocab_size)).newbyteorder("<")
    with open(bin_path, "wb") as out:
        for task, ids in zip(tasks, to_global):
            table = final[ids].astype(dtype)
            out.write(table[np.fromfile(task.part_file, dtype=np.uint32)].tobytes())
            os.remove(task.part_file)
    return tokenizer, replace(stats, unk=int(counts[replaced].sum()))


def _binarize(
    imap: Imap, source: Path, tokenizer_file: Path, bin_path: Path, dtype: str, workers: int
) -> SplitStats:
    """Encode `source` into `bin_path`; returns the split's counts."""
    ranges = line_ranges(source, _parts(source, workers))
    tasks = [
        EncodeTask(r, str(tokenizer_file), f"{bin_path}.part{i:05d}", dtype)
        for i, r in enumerate(ranges)
    ]
    stats = SplitStats()
    with open(bin_path, "wb") as out, _progress(source, f"encode {source.name}") as bar:
        for task, part in zip(tasks, imap(_encode_range, tasks)):  # in order: parts concatenate
            with open(task.part_file, "rb") as f:
                shutil.copyfileobj(f, out, COPY_BYTES)
            os.remove(task.part_file)
            stats += part
            bar.update(part.bytes)
    return stats


def _meta(tokenizer: Tokenizer, tokenizer_file: Path, dtype: str, splits: list[str]) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.kind,
        "tokenizer_file": tokenizer_file.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "eol_id": tokenizer.eol_id,
        "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id,
        "splits": splits,
    }


# ---------------------------------------------------------------------------------------------
# worker side: module-level functions, so a spawned process can run them


def _index_range(task: IndexTask) -> tuple[list[str], np.ndarray, SplitStats]:
    """Write the range's words as provisional ids (0 = end of line, then in order of first
    appearance, native uint32); returns the words in id order, their counts, the stats."""
    index, counts = FirstSeen({EOL_KEY: 0}), np.zeros(1, np.int64)
    stats = SplitStats(bytes=task.range.end - task.range.start)
    lookup = index.__getitem__
    with open(task.part_file, "wb") as out:
        for text in _read_blocks(task.range):
            ids = array("I")  # C unsigned int: 4 bytes wherever numpy runs
            for line in _lines(text):
                ids.extend(map(lookup, line.split()))
                ids.append(0)
            out.write(ids)
            block = np.bincount(np.frombuffer(ids, np.uint32), minlength=len(index))
            block[: len(counts)] += counts
            counts = block
            lines = text.count("\n")
            stats += SplitStats(tokens=len(ids), lines=lines, words=len(ids) - lines)
    return list(index), counts, stats


def _encode_range(task: EncodeTask) -> SplitStats:
    tokenizer = _load_tokenizer(task.tokenizer_file)
    dtype = np.dtype(task.dtype).newbyteorder("<")
    stats = SplitStats(bytes=task.range.end - task.range.start)
    with open(task.part_file, "wb") as out:
        for text in _read_blocks(task.range):
            block = tokenizer.encode_block(text)
            out.write(block.ids.astype(dtype, copy=False).tobytes())
            stats += SplitStats(len(block.ids), text.count("\n"), block.words, block.unk)
    return stats


@lru_cache(maxsize=1)
def _load_tokenizer(path: str) -> Tokenizer:
    return tokenizer_from_file(path)


def _read_blocks(r: Range) -> Iterator[str]:
    """Decoded text of the range, about BLOCK_BYTES of whole lines at a time, each block ending
    with "\\n" (supplied for a file's last line when it has none)."""
    with open(r.path, "rb") as f:
        f.seek(r.start)
        pos = r.start
        while pos < r.end:
            data = f.read(min(BLOCK_BYTES, r.end - pos))
            if not data:
                break  # the file shrank while we read it
            if not data.endswith(b"\n") and pos + len(data) < r.end:
                data += f.readline()  # finish the line; ranges end on line boundaries
            text = _decode(data, r.path, pos)
            pos += len(data)
            yield text if text.endswith("\n") else text + "\n"


def _decode(data: bytes, path: str | Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 at byte {offset + e.start} ({e.reason}); "
            "convert it first, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None


def _lines(text: str) -> list[str]:
    """Lines of a block that ends with "\\n"."""
    return text.split("\n")[:-1]


# ---------------------------------------------------------------------------------------------
# plumbing


def _wikitext_file(raw: Path, split: str) -> Path:
    if not raw.is_dir():
        raise UserError(f"{raw}: data.raw folder not found (see data/README.md to prepare one)")
    for suffix in ("tokens", "raw"):  # WikiText's tokenized files first, as its papers use
        path = raw / f"wiki.{split}.{suffix}"
        if path.is_file():
            return path
    raise UserError(
        f"{raw}: no wiki.{split}.tokens or wiki.{split}.raw; data.raw needs train, valid and "
        f"test (or give --{split}pref)"
    )


def _parts(path: Path, workers: int) -> int:
    return max(workers, math.ceil(path.stat().st_size / TASK_BYTES))


def _progress(path: Path, what: str) -> tqdm:
    # disable=None: a bar on terminals only, not in logs
    return tqdm(
        total=path.stat().st_size, desc=f"| {what}", unit="B", unit_scale=True, disable=None,
        leave=False,
    )  # fmt: skip
