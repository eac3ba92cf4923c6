"""Batches: what a target that is not scored looks like, and how samples become (B, T) tensors.

Every dataset yields tensors, every model scores targets; both meet here, below either.
"""

from __future__ import annotations

import torch

IGNORE = -100  # target value of positions that are not scored (e.g. the copy task's prompt)


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (inputs, targets) samples into (B, T) batches, right-padding short ones (inputs
    with 0, targets with IGNORE)."""
    width = max(len(x) for x, _ in samples)
    inputs = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(samples):
        inputs[row, : len(x)] = x
        targets[row, : len(y)] = y
    return inputs, targets


def chunk(batch: tuple[torch.Tensor, ...], shard, width: int) -> tuple[torch.Tensor, ...]:
    """A batch's chunk of every sequence (the inputs and targets of positions shard.start..),
    or the batch itself without context parallelism. A batch narrower than `width` (the context
    length: an evaluation set's last, shorter block) is first right-padded to it, unscored, so
    that every chunk is whole (a chunk shorter than the window would break the halo)."""
    if shard is None:
        return batch
    *inputs, targets = batch
    if targets.shape[1] < width:
        short = width - targets.shape[1]
        pad = torch.nn.functional.pad
        batch = (*(pad(x, (0, short)) for x in inputs), pad(targets, (0, short), value=IGNORE))
    length = width // shard.size
    start = shard.start(length)
    return tuple(t[:, start : start + length] for t in batch)


def unscored(sample: tuple) -> tuple:
    """`sample` with nothing scored: its targets (the last item: a tensor, or a label) IGNORE.
    Fills a process's share of a validation set up to the others' (their collectives match)."""
    *inputs, targets = sample
    if torch.is_tensor(targets):
        return (*inputs, torch.full_like(targets, IGNORE))
    return (*inputs, IGNORE)


def pad(documents: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad documents to the longest: (B, T) int64 tokens and (B,) int64 lengths."""
    lengths = torch.tensor([len(d) for d in documents], dtype=torch.long)
    tokens = torch.full((len(documents), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
    for row, d in enumerate(documents):
        tokens[row, : len(d)] = d
    return tokens, lengths
