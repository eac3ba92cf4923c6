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


def pad(documents: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad documents to the longest: (B, T) int64 tokens and (B,) int64 lengths."""
    lengths = torch.tensor([len(d) for d in documents], dtype=torch.long)
    tokens = torch.full((len(documents), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
    for row, d in enumerate(documents):
        tokens[row, : len(d)] = d
    return tokens, lengths
