"""Context parallelism: P processes each computing one chunk of every sequence give the outputs
and gradients one process gives for the whole sequence (fp32, relative 1e-6), for every kind it
serves, with rotary and learned positions, dropout on (the same masks), activation checkpointing
on and off; the traffic of the low-rank kinds does not grow with the length, full attention's
does."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sbtrain.attention.context_parallel import Shard, traffic
from sbtrain.batch import IGNORE, chunk
from sbtrain.config import AttentionConfig, DecoderConfig
from sbtrain.model import TransformerLM

KINDS = {
    "full": {"kind": "full"},
    "local": {"kind": "local", "window": 8},
    "performer": {"kind": "performer", "n_features": 16, "seed": 3},
    "scatterbrain": {"kind": "scatterbrain", "window": 8, "n_features": 16, "seed": 3},
    "scatterbrain-w0": {"kind": "scatterbrain", "window": 0, "n_features": 16, "seed": 3},
}
LENGTH, BATCH = 48, 2
TOLERANCE = 1e-6  # relative error, |a - b| / |b| over a whole tensor (fp32)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def model_of(attention: dict, positions: str) -> TransformerLM:
    torch.manual_seed(0)
    cfg = DecoderConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.1,
                        positions=positions, attention=AttentionConfig(**attention))  # fmt: skip
    return TransformerLM(cfg, 50, LENGTH)


def step(model: TransformerLM, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states of `tokens`, and backward of a weighted sum of them (dropout drawn from a
    generator state set alike everywhere)."""
    torch.manual_seed(7)
    model.zero_grad()
    hidden = model(tokens)
    (hidden * weights).sum().backward()
    return hidden.detach()


def worker(rank: int, size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 50, (BATCH, LENGTH), generator=g)
        weights = torch.randn(BATCH, LENGTH, 16, generator=g)
        chunk = LENGTH // size
        mine = slice(rank * chunk, (rank + 1) * chunk)
        for positions in ("rope", "learned"):
            for name, attention in KINDS.items():
                whole = model_of(attention, positions)
                expected = step(whole, tokens, weights)[:, mine]
                split = model_of(attention, positions)
                split.shard = Shard(rank, size, None)
                # with learned positions the chunks recompute under activation checkpointing
                split.activation_checkpointing = positions == "learned"
                got = step(split, tokens[:, mine], weights[:, mine])
                where = f"{name} {positions} P={size} rank {rank}"
                assert relative(got, expected) < TOLERANCE, (where, relative(got, expected))
                for (p, a), b in zip(whole.named_parameters(), split.parameters()):
                    grad = b.grad.clone()
                    dist.all_reduce(grad)  # every chunk's share of the gradient
                    error = relative(grad, a.grad)
                    assert error < TOLERANCE, (where, p, error)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [2, 4])
def test_chunks_on_processes_equal_one_process(size):
    mp.spawn(worker, args=(size, free_port()), nprocs=size, join=True)


def count_traffic(rank: int, size: int, port: int, lengths: list[int], out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for name in ("full", "scatterbrain"):
            for length in lengths:
                for recompute in (False, True):
                    model = model_of(KINDS[name], "rope")
                    model.max_len, model.activation_checkpointing = length, recompute
                    shard = model.shard = Shard(rank, size, None)
                    tokens = torch.randint(0, 50, (1, length // size))
                    model(tokens).sum().backward()
                    if rank == 0:
                        out.put((name, length, recompute, shard.sent[0]))
    finally:
        dist.destroy_process_group()


def test_bytes_sent_stay_flat_for_scatterbrain_and_grow_for_full():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(count_traffic, args=(2, free_port(), [32, 64, 128], queue), nprocs=2, join=True)
    sent, recomputed = {}, {}
    while not queue.empty():
        name, length, recompute, nbytes = queue.get()
        (recomputed if recompute else sent)[name, length] = nbytes
    assert sent["scatterbrain", 32] == sent["scatterbrain", 64] == sent["scatterbrain", 128]
    assert sent["full", 128] == 2 * sent["full", 64] == 4 * sent["full", 32]
    # full: 2 layers x (k, v) of (1, 2 heads, L/2, 8) fp32 to the other process, and their
    # gradients back (a ring all-reduce of both chunks: 2 x (P - 1) / P of their bytes)
    chunk = 2 * (128 // 2) * 8 * 4
    assert sent["full", 128] == 2 * 2 * (chunk + 2 * chunk)
    for (name, length), nbytes in sent.items():  # the formula the benchmark reports with
        options = {"window": 8, "n_features": 16} if name == "scatterbrain" else {}
        assert 2 * traffic(name, 1, 2, 8, length, 2, **options) == nbytes
        # activation checkpointing: the forward exchanges once more, the backward once
        again = 2 * traffic(name, 1, 2, 8, length, 2, **options, forwards=2)
        assert recomputed[name, length] == again > nbytes


def test_a_short_last_block_is_padded_unscored_into_whole_chunks():
    inputs = torch.arange(1, 11).reshape(2, 5)
    targets = inputs + 100
    parts = [chunk((inputs, targets), Shard(rank, 2), width=8) for rank in range(2)]
    assert all(x.shape == y.shape == (2, 4) for x, y in parts)  # whole chunks of 8 / 2
    whole_inputs = torch.cat([x for x, _ in parts], 1)
    whole_targets = torch.cat([y for _, y in parts], 1)
    assert torch.equal(whole_inputs[:, :5], inputs) and torch.equal(whole_targets[:, :5], targets)
    assert (whole_targets[:, 5:] == IGNORE).all()  # the padding is never scored
    assert chunk((inputs, targets), None, width=8)[1] is targets  # one process: as it is
