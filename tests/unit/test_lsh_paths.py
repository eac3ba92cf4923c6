"""LSH's two ways to the same sums (sbtrain/attention/lsh.py): dense masked scores (short
sequences) and gathered support rows (long ones) give the same parts, feature parts and
gradients, over several query blocks, causal (also T < L, as in decoding) and non-causal with
ragged padding, with and without a window, including padded queries whose support is empty."""

from __future__ import annotations

import pytest
import torch

from sbtrain.attention import lsh
from sbtrain.attention.common import EMPTY
from sbtrain.attention.lsh import KeyFeatures, QueryFeatures, dense_is_cheaper, lsh_parts

B, H, D, E, M = 2, 3, 8, 9, 5


def run(dense: bool, length: int, count: int, window: int, real, monkeypatch, seed=0):
    """Both parts of `lsh_parts` and the gradients of a random loss on them, one path forced,
    with blocks of a few queries (so several blocks, and the causal reach, are exercised)."""
    monkeypatch.setattr(lsh, "DENSE", dense)
    monkeypatch.setattr(lsh, "BLOCK_ELEMENTS", 2000)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, vx = randn(B, H, count, D), randn(B, H, length, D), randn(B, H, length, E)
    qw, kw = randn(B, H, count, M).exp(), randn(B, H, length, M).exp()
    q_top, k_top = randn(B, H, count), randn(B, H, length)
    rotations = lsh.draw_rotations(D, 2, 4, torch.Generator().manual_seed(seed + 1))
    leaves = [x.requires_grad_() for x in (q, k, vx, qw, kw)]
    features = (QueryFeatures(qw, q_top), KeyFeatures(kw, k_top))
    exact, products = lsh_parts(q, k, vx, rotations, 3, window, features, real=real)
    weights = [randn(*exact.nd.shape) for _ in range(2)]
    loss = (exact.nd * weights[0]).sum() + (products.nd * weights[1]).sum()
    return exact, products, torch.autograd.grad(loss, leaves)


CASES = {
    "causal": (40, 40, 0, None),
    "causal-window": (40, 40, 4, None),
    "decoding": (40, 5, 0, None),  # the last T = 5 queries of 40 keys
    "non-causal": (33, 33, 0, torch.arange(33) < torch.tensor([[33], [20]])),
    "non-causal-window": (33, 33, 5, torch.rand(2, 33, generator=torch.Generator()) < 0.6),
    "no-real-token": (33, 33, 0, torch.arange(33) < torch.tensor([[12], [0]])),
}


@pytest.mark.parametrize("case", CASES)
def test_dense_and_gathered_paths_agree(case, monkeypatch):
    length, count, window, real = CASES[case]
    dense = run(True, length, count, window, real, monkeypatch)
    gathered = run(False, length, count, window, real, monkeypatch)
    for got, want in zip(dense[:2], gathered[:2]):
        assert torch.allclose(got.log_scale, want.log_scale, rtol=1e-12, atol=0)
        assert torch.allclose(got.nd, want.nd, rtol=1e-10, atol=1e-12)
    for got, want in zip(dense[2], gathered[2]):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    if case == "no-real-token":
        # row 1 has no real token: its queries see nothing (the EMPTY log-scale, zero sums)
        for exact, products, _ in (dense, gathered):
            assert (exact.log_scale[1] == EMPTY).all() and (exact.log_scale[0] > EMPTY).all()
            assert (exact.nd[1] == 0).all() and (products.nd[1] == 0).all()


def test_the_supports_are_not_trivial():
    """The agreement above means something only if supports hold several keys, repeats and
    window keys among them: count them on the causal case's support."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, 40, D, generator=gen, dtype=torch.float64)
    rotations = lsh.draw_rotations(D, 2, 4, torch.Generator().manual_seed(1))
    buckets = lsh.hash_buckets(k, rotations)
    index = lsh.index_keys(buckets)
    _, keep = lsh.lsh_support(buckets, torch.arange(40), index, 3)
    kept = keep.sum(-1)  # itself and up to 3 keys per round (itself found again by each)
    assert kept.max() == 5 and (~keep).any()  # supports of several keys, and repeats dropped
    window = lsh._Support(buckets, torch.arange(40), index, 3, 0, 4, None).block(slice(None))
    assert (window[1].sum(-1) < kept).any()  # the window takes keys away


@pytest.mark.parametrize(
    "length, support_size, dense",
    [(256, 33, True), (400, 49, True), (2048, 257, False), (1000, 7, False)],
)
def test_the_dense_path_is_chosen_where_it_was_measured_faster(length, support_size, dense):
    """The LRA CPU shapes (L = 256, 2 x 16; L = 400, 2 x 24) go dense; the 2k benchmark
    (2 x 128) and long sequences keep gathering (measurements in lsh.py's docstring)."""
    assert dense_is_cheaper(length, support_size) is dense


def test_the_automatic_choice_calls_the_chosen_path(monkeypatch):
    calls = []
    for name in ("_DenseSums", "_SupportSums"):
        function = getattr(lsh, name)
        record = lambda *a, f=function, n=name: calls.append(n) or f.apply(*a)  # noqa: E731
        spy = type(name, (), {"apply": record})
        monkeypatch.setattr(lsh, name, spy)
    rotations = lsh.draw_rotations(D, 2, 4, torch.Generator().manual_seed(1))
    for length in (24, 200):
        q, k, vx = (torch.randn(1, 1, length, D) for _ in range(3))
        lsh_parts(q, k, vx, rotations, 3)
    assert dense_is_cheaper(24, 7) and not dense_is_cheaper(200, 7)
    assert calls == ["_DenseSums", "_SupportSums"]
