"""Recall tasks generated here, each written as JSONL splits (sbtrain.recall.format) so one reader
binarizes generated and user data alike.

- MQAR, multi-query associative recall as Zoology (Arora et al. 2023) specifies it: K key-value
  pairs `k1 v1 ... kK vK` open the sequence (keys drawn from ids 1..V/2-1, values from V/2..V-1,
  none repeated within a sequence); each key is then queried once, at query slot g (position
  2K + 2g) drawn without replacement with probability proportional to (g+1)^(a-1) (a = 0.01,
  Zoology's default, puts most queries right after the pairs; a = 1 is uniform); the value is the
  target at the query's position. Other positions hold 0, or random ids (`random_filler`).
- Selective copying: N data tokens (ids 2..V-1) at random positions among blanks (0) in the first
  T - N positions, then a marker (1) and the data again: the model predicts the data in order.
- Passkey retrieval, token level: noise (ids 3..V-1), somewhere a key marker (1) and a key of M
  tokens, and at the end a query marker (2) and the key again: the model predicts the key.

Generation runs in chunks, each drawn from its own random stream (seed, split, chunk number) and
merged in chunk order, so the output does not depend on the number of worker processes; a
sequence already drawn (in any split) is dropped, so the splits are disjoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from sbtrain.config import Section, opt
from sbtrain.errors import UserError
from sbtrain.staging import worker_map

SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
EMPTY_ROUNDS = 20  # rounds of chunks without a new sequence before giving up


@dataclass(frozen=True)
class Generated(Section):
    """Sizes and seed every generator shares (its recipe section adds its own settings)."""

    train: int = opt(100_000, "sequences in train", "positive")
    valid: int = opt(1_000, "sequences in valid", "non-negative")
    test: int = opt(1_000, "sequences in test", "non-negative")
    seed: int = opt(0, "generator seed: the same splits whatever the number of workers")
    chunk: int = opt(
        1_000, "sequences per unit of work (each has its own random stream)", "positive"
    )

    name: ClassVar[str]

    def check_length(self, length: int) -> None:
        """Raise ValueError("key: why") if sequences of `length` tokens cannot hold the task."""

    def draw(self, rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` sequences of `length`: inputs (n, T) int64 and targets (n, T) int64, -1 = null."""
        raise NotImplementedError


@dataclass(frozen=True)
class MQARConfig(Generated):
    """Multi-query associative recall (a recipe's `mqar:`)."""

    vocab_size: int = opt(256, "V: keys are ids 1..V/2-1, values V/2..V-1", "positive")
    pairs: int = opt(8, "K: key-value pairs per sequence, each queried once", "positive")
    power_a: float = opt(
        0.01, "query gaps ~ (g+1)^(a-1): 0.01 (Zoology) .. 1 (uniform)", "positive"
    )
    random_filler: bool = opt(False, "other positions hold random ids (else 0)")

    name = "mqar"

    def contradictions(self):
        if self.pairs > self.vocab_size // 2 - 1:
            yield "pairs", f"{self.pairs} distinct keys need vocab_size >= {2 * self.pairs + 2}"

    def check_length(self, length: int) -> None:
        if length < 4 * self.pairs:
            raise ValueError(
                f"pairs: {self.pairs} pairs and their queries need data.tokens_per_sample >= "
                f"{4 * self.pairs}, it is {length}"
            )

    def draw(self, rng, n, length):
        k, v = self.pairs, self.vocab_size
        half = v // 2
        keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :k] + 1
        values = np.argsort(rng.random((n, v - half)), axis=1)[:, :k] + half
        slots = (length - 2 * k) // 2
        log_weight = (self.power_a - 1.0) * np.log(np.arange(1, slots + 1))
        gumbel = -np.log(-np.log(rng.random((n, slots))))  # top-k of these: weighted, no repeats
        gaps = np.argsort(-(log_weight + gumbel), axis=1)[:, :k]
        if self.random_filler:
            inputs = rng.integers(0, v, (n, length))
        else:
            inputs = np.zeros((n, length), np.int64)
        inputs[:, 0 : 2 * k : 2], inputs[:, 1 : 2 * k : 2] = keys, values
        queries = 2 * k + 2 * gaps
        targets = np.full((n, length), -1, np.int64)
        np.put_along_axis(inputs, queries, keys, axis=1)
        np.put_along_axis(targets, queries, values, axis=1)
        return inputs, targets


@dataclass(frozen=True)
class SelectiveCopyConfig(Generated):
    """Selective copying (a recipe's `selective_copy:`): 0 is blank, 1 the marker."""

    vocab_size: int = opt(32, "ids: 0 blank, 1 marker, 2..V-1 data", "positive")
    tokens: int = opt(8, "N: data tokens to copy, in order", "positive")

    name = "selective_copy"
    BLANK: ClassVar[int] = 0
    MARKER: ClassVar[int] = 1

    def contradictions(self):
        if self.vocab_size < 3:
            yield "vocab_size", f"must be at least 3 (blank, marker, data), got {self.vocab_size}"

    def check_length(self, length: int) -> None:
        if length < 2 * self.tokens:
            raise ValueError(
                f"tokens: {self.tokens} data tokens and their copy need data.tokens_per_sample "
                f">= {2 * self.tokens}, it is {length}"
            )

    def draw(self, rng, n, length):
        m = self.tokens
        context = length - m
        data = rng.integers(2, self.vocab_size, (n, m))
        where = np.sort(np.argsort(rng.random((n, context)), axis=1)[:, :m], axis=1)
        inputs = np.full((n, length), self.BLANK, np.int64)
        np.put_along_axis(inputs, where, data, axis=1)
        inputs[:, context] = self.MARKER
        inputs[:, context + 1 :] = data[:, :-1]
        targets = np.full((n, length), -1, np.int64)
        targets[:, context:] = data
        return inputs, targets


@dataclass(frozen=True)
class PasskeyConfig(Generated):
    """Passkey retrieval, token level (a recipe's `passkey:`): 1 marks the key, 2 the query."""

    vocab_size: int = opt(64, "ids: 1 key marker, 2 query marker, 3..V-1 noise and key", "positive")
    key_length: int = opt(4, "M: tokens of the key", "positive")

    name = "passkey"
    KEY: ClassVar[int] = 1
    QUERY: ClassVar[int] = 2

    def contradictions(self):
        if self.vocab_size < 4:
            yield "vocab_size", f"must be at least 4 (markers, content), got {self.vocab_size}"

    def check_length(self, length: int) -> None:
        if length < 2 * self.key_length + 1:
            raise ValueError(
                f"key_length: a key of {self.key_length} and its query need "
                f"data.tokens_per_sample >= {2 * self.key_length + 1}, it is {length}"
            )

    def draw(self, rng, n, length):
        m = self.key_length
        body = length - m  # noise with the key inside, then the query marker and the key
        inputs = rng.integers(3, self.vocab_size, (n, length))
        key = rng.integers(3, self.vocab_size, (n, m))
        depth = rng.integers(0, body - m, n)  # where the key marker goes: 0 .. body - m - 1
        rows = np.arange(n)[:, None]
        inputs[rows, depth[:, None]] = self.KEY
        inputs[rows, depth[:, None] + 1 + np.arange(m)] = key
        inputs[:, body] = self.QUERY
        inputs[:, body + 1 :] = key[:, :-1]
        targets = np.full((n, length), -1, np.int64)
        targets[:, body:] = key
        return inputs, targets


GENERATORS = {c.name: c for c in (MQARConfig, SelectiveCopyConfig, PasskeyConfig)}


def write_jsonl(config: Generated, length: int, folder: Path, workers: int = 1) -> None:
    """train.jsonl, valid.jsonl and test.jsonl of `config` at `length` tokens into `folder` (a
    split asked to hold no sequence is not written)."""
    try:
        config.check_length(length)
    except ValueError as e:
        raise UserError(f"{config.name}.{e}") from None
    seen: set[bytes] = set()
    with worker_map(workers) as imap:
        for split in [s for s in SPLIT_IDS if getattr(config, s)]:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as out:
                for inputs, targets in unique(config, split, length, seen, imap, workers):
                    out.write(json.dumps({"input": inputs, "target": targets}) + "\n")


def unique(config: Generated, split: str, length: int, seen: set, imap, workers: int) -> Iterator:
    """The split's sequences as lists (None for null targets), none repeated in any split."""
    wanted, made, next_chunk, empty_rounds = getattr(config, split), 0, 0, 0
    while made < wanted:
        # enough chunks for what is missing (at least one per worker); rows are taken in chunk
        # order and a round's surplus is only ever at the end, so the result does not depend
        # on `workers`
        count = max(workers, -(-(wanted - made) // config.chunk))
        jobs = [(config, split, next_chunk + i, length) for i in range(count)]
        next_chunk += count
        before = made
        for inputs, targets in imap(draw_chunk, jobs):
            for row, target in zip(inputs, targets):
                digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                if made == wanted or digest in seen:
                    continue
                seen.add(digest)
                made += 1
                yield row.tolist(), [None if t < 0 else t for t in target.tolist()]
        empty_rounds = empty_rounds + 1 if made == before else 0
        if empty_rounds >= EMPTY_ROUNDS:
            raise UserError(
                f"{config.name}: found only {made} distinct {split} sequences of {wanted}; "
                "ask for fewer or make the task larger (vocab_size, length)"
            )


def draw_chunk(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of a split, from its own stream (a worker process runs this)."""
    config, split, chunk, length = job
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], chunk])
    return config.draw(rng, config.chunk, length)
