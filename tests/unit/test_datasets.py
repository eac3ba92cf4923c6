"""LM blocks, the Copy task and the resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbtrain.batch import IGNORE, collate
from sbtrain.datasets import CopyTask, EpochSampler, LMBlocks
from sbtrain.errors import UserError

EOL = 2


def scored(dataset):
    """All (position in the split, target) pairs the dataset scores, in order."""
    out = []
    for b in range(len(dataset)):
        _, y = dataset[b]
        keep = (y != IGNORE).nonzero().flatten()
        first = b * dataset.length
        out += [(first + i, int(y[k])) for i, k in enumerate(keep)]
    return out


@pytest.mark.parametrize(
    "n, length, context", [(100, 16, 0), (100, 16, 5), (7, 16, 3), (64, 16, 15)]
)
def test_evaluation_blocks_score_every_token_exactly_once(n, length, context):
    tokens = np.arange(10, 10 + n, dtype=np.uint16)
    blocks = LMBlocks(tokens, EOL, length, context=context, drop_last=False)
    pairs = scored(blocks)
    assert [p for p, _ in pairs] == list(range(n))
    assert [t for _, t in pairs] == tokens.tolist()


def test_inputs_are_targets_shifted_with_an_end_of_line_in_front():
    tokens = np.arange(10, 50, dtype=np.uint16)
    blocks = LMBlocks(tokens, EOL, 16)
    x0, y0 = blocks[0]
    assert x0[0] == EOL and x0[1:].tolist() == y0[:-1].tolist()
    x1, _ = blocks[1]
    assert x1[0] == y0[-1]  # no target lost at block boundaries
    assert len(blocks) == 2  # training drops the short tail


def test_context_tokens_precede_each_block_and_are_not_scored():
    tokens = np.arange(10, 74, dtype=np.uint16)
    x, y = LMBlocks(tokens, EOL, 16, context=8, drop_last=False)[2]  # targets 32..47
    assert len(x) == 24
    assert (y[:8] == IGNORE).all() and y[8:].tolist() == tokens[32:48].tolist()
    assert x.tolist() == tokens[23:47].tolist()


def test_copy_samples_are_0_w_0_w_and_score_only_the_second_copy():
    task = CopyTask(n_symbols=9, length=5, size=10, seed=3)
    x, y = task[4]
    seq = torch.cat([x, y[-1:]])
    w = seq[1:6]
    assert seq[0] == 0 and seq[6] == 0 and seq[7:].tolist() == w.tolist()
    assert ((w >= 1) & (w <= 9)).all()
    assert (y[:6] == IGNORE).all() and y[6:].tolist() == w.tolist()
    assert torch.equal(task[4][0], x)  # a sample is a function of (seed, epoch, index)
    assert not torch.equal(CopyTask(9, 5, 10, seed=3, epoch=1)[4][0], x)


def test_collate_pads_inputs_and_ignores_padded_targets():
    x, y = collate(
        [(torch.tensor([5, 6]), torch.tensor([6, 7])), (torch.tensor([8]), torch.tensor([9]))]
    )
    assert x.tolist() == [[5, 6], [8, 0]] and y.tolist() == [[6, 7], [9, IGNORE]]


def take(sampler, n):
    out = []
    while len(out) < n:
        for batch in sampler.epoch_batches():
            out.append((sampler.epoch, batch))
            if len(out) == n:
                return out
        sampler.next_epoch()
    return out


def test_restored_sampler_yields_exactly_the_remaining_batches():
    full = take(EpochSampler(50, 8, seed=1), 20)  # crosses epochs (6 batches each)
    first = EpochSampler(50, 8, seed=1)
    head = take(first, 9)
    state = first.state_dict()
    second = EpochSampler(50, 8, seed=1)
    second.load_state_dict(state)
    assert head + take(second, 11) == full


def test_epochs_are_different_permutations_of_whole_batches():
    sampler = EpochSampler(50, 8, seed=1)
    e1 = [i for _, b in take(sampler, 6) for i in b]
    e2 = [i for _, b in take(sampler, 6) for i in b]
    assert len(set(e1)) == 48 and e1 != e2


def test_ranks_take_disjoint_slices_that_cover_each_global_batch():
    one = take(EpochSampler(50, 8, seed=4), 6)
    r0 = take(EpochSampler(50, 8, seed=4, rank=0, world_size=2), 6)
    r1 = take(EpochSampler(50, 8, seed=4, rank=1, world_size=2), 6)
    for (_, whole), (_, a), (_, b) in zip(one, r0, r1):
        assert not set(a) & set(b)
        assert a + b == whole


def test_a_batch_that_cannot_be_split_over_processes_is_refused():
    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        EpochSampler(50, 8, seed=1, rank=0, world_size=3)
