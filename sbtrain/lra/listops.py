"""ListOps (Nangia & Bowman 2018, as the Long Range Arena generates it): nested lists of
operators over digits, whose value (0-9) is the class.

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

Operators: MAX, MIN, MED (median; of an even count, the mean of the middle two rounded down,
as the release's int(median)) and SM (sum modulo 10). A tree is drawn as the release does: a
node at depth < max_depth is an operator with probability 1/4 (2..max_args arguments, each a
subtree), else a digit; the root is at depth 1, so leaves are at depth <= max_depth and
operators nest at most max_depth - 1 deep. Trees whose token count falls outside
[min_tokens, max_tokens] are redrawn; duplicates are dropped, across splits too.

Tokens: the digits, "]", "[MAX", "[MIN", "[MED", "[SM" (ids in SYMBOLS order). The release's
text also wraps every argument in "( ... )" pairs; they are a fixed function of the brackets
and its own training input drops them, so they are not tokens here (see data/README.md).

Generation is split into chunks of `chunk` examples, each drawn from its own random stream
(seeded by the seed and the chunk's number) and merged in chunk order: the output depends on
the settings only, not on the number of worker processes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sbtrain.config import Section, opt
from sbtrain.lra.format import Examples, SplitStats, make_meta, write_meta, write_split
from sbtrain.staging import worker_map

SYMBOLS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "]", "[MAX", "[MIN", "[MED", "[SM")
CLOSE, MAX, MIN, MED, SM = 10, 11, 12, 13, 14
EMPTY_ROUNDS = 20  # rounds of chunks without a new sequence before giving up
OPERATOR_P = 0.25  # chance that a node above the last level is an operator (the release's)


@dataclass(frozen=True)
class ListOpsConfig(Section):
    """What to generate (defaults: the Long Range Arena's ListOps); a recipe's `listops:`."""

    train: int = opt(96_000, "examples in train (LRA: 96,000)", "non-negative")
    valid: int = opt(2_000, "examples in valid (LRA: 2,000)", "non-negative")
    test: int = opt(2_000, "examples in test (LRA: 2,000)", "non-negative")
    min_tokens: int = opt(500, "shortest sequence kept, tokens (LRA: 500)", "positive")
    max_tokens: int = opt(2_000, "longest sequence kept, tokens (LRA: 2,000)", "positive")
    max_depth: int = opt(10, "tree levels, leaves included (operators nest max_depth - 1 deep)")
    max_args: int = opt(10, "most arguments of one operator (at least 2)")
    seed: int = opt(0, "generator seed: the same splits whatever the number of workers")
    chunk: int = opt(200, "examples per unit of work (each has its own random stream)", "positive")

    def contradictions(self):
        if self.min_tokens > self.max_tokens:
            yield "min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
        for key in ("max_depth", "max_args"):
            if getattr(self, key) < 2:
                yield key, f"must be at least 2, got {getattr(self, key)}"


class _TooLong(Exception):
    pass


def prepare(folder: str | Path, config: ListOpsConfig, workers: int = 1) -> dict[str, SplitStats]:
    """Generate ListOps and write train/valid/test and meta.json into `folder`."""
    splits = generate(config, workers)
    stats = {
        name: write_split(folder, name, [examples], "uint8") for name, examples in splits.items()
    }
    meta = make_meta(
        "listops",
        "symbols",
        len(SYMBOLS),
        10,
        list(splits),
        symbols=list(SYMBOLS),
        source={"generator": "listops", **asdict(config)},
    )
    write_meta(folder, meta)
    return stats


def generate(config: ListOpsConfig, workers: int = 1) -> dict[str, Examples]:
    """The three splits: unique token sequences (uint8 ids) and their values."""
    wanted = config.train + config.valid + config.test
    seen: set[bytes] = set()
    tokens, labels = [], []
    next_chunk = empty_rounds = 0
    with worker_map(workers) as imap:
        while len(tokens) < wanted:
            # enough chunks for what is missing (at least one per worker); which chunks run
            # depends only on the counts so far, so the result does not depend on `workers`
            count = max(workers, -(-(wanted - len(tokens)) // config.chunk))
            jobs = [(config, i) for i in range(next_chunk, next_chunk + count)]
            next_chunk += count
            before = len(tokens)
            for chunk_tokens, chunk_labels in imap(_chunk, jobs):
                for seq, label in zip(chunk_tokens, chunk_labels):
                    if len(tokens) < wanted and seq not in seen:
                        seen.add(seq)
                        tokens.append(seq)
                        labels.append(label)
            empty_rounds = 0 if len(tokens) > before else empty_rounds + 1
            if empty_rounds == EMPTY_ROUNDS:  # nothing new for long: (almost) none are left
                raise ValueError(
                    f"ListOps: found only {before} distinct sequences for {config}; ask for "
                    "fewer examples or widen the length range"
                )
    bounds = {"train": (0, config.train)}
    bounds["valid"] = (config.train, config.train + config.valid)
    bounds["test"] = (config.train + config.valid, wanted)
    return {
        name: Examples([np.frombuffer(t, np.uint8) for t in tokens[a:b]], labels[a:b])
        for name, (a, b) in bounds.items()
        if b > a
    }


def _chunk(job: tuple[ListOpsConfig, int]) -> tuple[list[bytes], list[int]]:
    """`config.chunk` examples (token ids as bytes, value) from chunk `index`'s own stream."""
    config, index = job
    rng = random.Random(f"listops:{config.seed}:{index}")
    tokens, labels = [], []
    while len(tokens) < config.chunk:
        out: list[int] = []
        try:
            value = _subtree(rng, 1, config, out)
        except _TooLong:
            continue
        if config.min_tokens <= len(out) <= config.max_tokens:
            tokens.append(bytes(out))
            labels.append(value)
    return tokens, labels


def _subtree(rng: random.Random, depth: int, config: ListOpsConfig, out: list[int]) -> int:
    """Append a random subtree's tokens to `out` and return its value; _TooLong as soon as
    `out` passes max_tokens (the tree would be redrawn anyway)."""
    if depth < config.max_depth and rng.random() < OPERATOR_P:
        op = MAX + rng.randrange(4)
        out.append(op)
        args = []
        for _ in range(rng.randint(2, config.max_args)):
            if len(out) + 2 > config.max_tokens:  # an argument and "]" would pass the limit
                raise _TooLong
            args.append(_subtree(rng, depth + 1, config, out))
        out.append(CLOSE)
        return apply(op, args)
    digit = rng.randrange(10)
    out.append(digit)
    return digit


def apply(op: int, args: list[int]) -> int:
    """Value of operator id `op` on its argument values."""
    if op == MAX:
        return max(args)
    if op == MIN:
        return min(args)
    if op == SM:
        return sum(args) % 10
    ordered = sorted(args)
    half = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[half]
    return (ordered[half - 1] + ordered[half]) // 2


def to_text(tokens) -> str:
    """The sequence as text, tokens separated by spaces."""
    return " ".join(SYMBOLS[int(t)] for t in tokens)
