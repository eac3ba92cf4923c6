"""Options of every attention kind: defaults, user-facing errors, and random buffers as state."""

from __future__ import annotations

import re

import pytest
import torch

from sbtrain.attention import KINDS, build_attention, check_attention
from sbtrain.config import AttentionConfig

D = 8


def inputs(length: int = 50):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, length, D, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_with_defaults(kind):
    out = build_attention(kind, head_dim=D)(*inputs())
    assert out.shape == (1, 2, 50, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("sparse", ["local", "lsh", "local+lsh"])
def test_scatterbrain_builds_with_defaults_for_every_sparse_part(sparse):
    out = build_attention("scatterbrain", head_dim=D, sparse=sparse)(*inputs())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("local", dict(window=0), "window must be a positive integer"),
        ("local", dict(window=-3), "window must be a positive integer"),
        ("performer", dict(n_features=7), "n_features must be a positive even integer"),
        ("performer", dict(n_features=0), "n_features must be a positive even integer"),
        ("performer", dict(chunk_size=0), "chunk_size must be a positive integer"),
        ("performer", dict(seed=-1), "seed must be a non-negative integer"),
        ("lsh", dict(n_buckets=3), "n_buckets must be an even integer"),
        ("lsh", dict(bucket_size=0), "bucket_size must be a positive integer"),
        ("lsh", dict(n_hashes=0), "n_hashes must be a positive integer"),
        ("scatterbrain", dict(sparse="dense"), "sparse must be one of local, lsh, local+lsh"),
        ("scatterbrain", dict(sparse="lsh", window=16), "does not use window"),
        ("scatterbrain", dict(sparse="local", n_hashes=2), "does not use n_hashes"),
        ("scatterbrain", dict(window=16, chunk_size=8), "chunk_size is not an option"),
        ("scatterbrain", dict(window=-1), "window must be an integer >= 0"),
        ("scatterbrain", dict(n_features=5), "n_features must be a positive even integer"),
        ("scatterbrain", dict(sparse="lsh", n_buckets=1), "n_buckets must be an even integer"),
    ],
)
def test_impossible_values_are_value_errors(kind, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_attention(kind, D, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_attention(kind, head_dim=D, **options)


@pytest.mark.parametrize(
    ("kind", "option"),
    [("full", "window"), ("local", "n_features"), ("performer", "window"), ("lsh", "window")],
)
def test_options_a_kind_does_not_take_are_type_errors(kind, option):
    with pytest.raises(TypeError, match=f"does not take {option}"):
        check_attention(kind, D, **{option: 4})


def test_attention_config_options_build():
    config = AttentionConfig(kind="scatterbrain", sparse="local", window=16, n_features=8, seed=3)
    attn = build_attention(config.kind, head_dim=D, **config.options())
    assert attn.window == 16 and attn.n_features == 8


RANDOM = {
    "performer": dict(n_features=8),
    "lsh": dict(n_hashes=2, bucket_size=4, n_buckets=4),
    "scatterbrain": dict(sparse="local+lsh", window=4, n_features=8, n_hashes=2, bucket_size=4),
}


@pytest.mark.parametrize("kind", RANDOM)
def test_random_buffers_are_saved_and_restored(kind):
    source = build_attention(kind, head_dim=D, seed=1, **RANDOM[kind])
    target = build_attention(kind, head_dim=D, seed=2, **RANDOM[kind])
    assert not torch.equal(source(*inputs()), target(*inputs()))
    state = source.state_dict()
    assert set(state) >= {"projection"} or set(state) >= {"rotations"}
    target.load_state_dict(state)
    assert all(torch.equal(state[key], target.state_dict()[key]) for key in state)
    assert torch.equal(source(*inputs()), target(*inputs()))


@pytest.mark.parametrize("kind", RANDOM)
def test_seeds_make_buffers_deterministic_and_redraw_is_explicit(kind):
    first = build_attention(kind, head_dim=D, seed=5, **RANDOM[kind])
    again = build_attention(kind, head_dim=D, seed=5, **RANDOM[kind])
    assert all(torch.equal(a, b) for a, b in zip(first.buffers(), again.buffers()))
    torch.manual_seed(0)
    unseeded = build_attention(kind, head_dim=D, **RANDOM[kind])
    torch.manual_seed(0)
    unseeded_again = build_attention(kind, head_dim=D, **RANDOM[kind])
    assert all(torch.equal(a, b) for a, b in zip(unseeded.buffers(), unseeded_again.buffers()))
    before = [b.clone() for b in first.buffers()]
    first(*inputs())
    assert all(torch.equal(a, b) for a, b in zip(before, first.buffers()))  # no silent redraw
    first.redraw(6)
    assert not all(torch.equal(a, b) for a, b in zip(before, first.buffers()))
    other = build_attention(kind, head_dim=D, seed=6, **RANDOM[kind])
    assert all(torch.equal(a, b) for a, b in zip(first.buffers(), other.buffers()))


def test_projection_rows_are_orthogonal_within_a_block():
    attn = build_attention("performer", head_dim=D, n_features=2 * D, seed=0)
    rows = attn.projection.double()  # (D, D): one orthogonal block
    gram = rows @ rows.T
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-5)
