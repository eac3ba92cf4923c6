"""Dense float64 definitions of every attention kind: the oracle for tests and `bench approx`.

Each returns the full (L x L) normalised attention matrix a module computes, built by brute force
from the module's own buffers (projection W, LSH rotations) and written independently of the fast
kernels: no chunks, no stabilisers, no sorting. Rows sum to 1; entries above the diagonal are 0.
Cost O(L^2) memory: for tests and small benchmarks only. Because a twin shares the module's
random draws, it checks the kernels, not the draws: tests/unit/test_estimators.py checks those
(unbiased feature products, chi row lengths, orthogonal blocks, LSH buckets, exact softmax).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sbtrain.attention.full import FullAttention
from sbtrain.attention.local import LocalAttention
from sbtrain.attention.lsh import LSHAttention
from sbtrain.attention.performer import PerformerAttention
from sbtrain.attention.scatterbrain import ScatterbrainAttention


def reference_matrix(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k: (B, H, L, D) -> (B, H, L, L) float64 attention matrix of `module`'s kind."""
    q, k = q.double(), k.double()
    tau = q.shape[-1] ** -0.5
    scores = tau * q @ k.transpose(-1, -2)
    length = q.shape[-2]
    past = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if isinstance(module, FullAttention):
        return _softmax_over(past, scores)
    if isinstance(module, LocalAttention):
        return _softmax_over(_window(length, module.window, q.device), scores)
    if isinstance(module, LSHAttention):
        support = _lsh_support(q, k, module.rotations, module.bucket_size)
        return _softmax_over(support, scores)
    if isinstance(module, PerformerAttention):
        return _rows_normalised(_feature_products(q, k, module.projection) * past)
    if isinstance(module, ScatterbrainAttention):
        support = _window(length, module.window, q.device).expand_as(scores)
        if module.lsh:
            support = support | _lsh_support(q, k, module.rotations, module.bucket_size)
        ahat = torch.where(support, scores.exp(), _feature_products(q, k, module.projection))
        return _rows_normalised(ahat * past)
    raise TypeError(f"no reference for {type(module).__name__}")


def reference_attention(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """(B, H, L, D) each -> (B, H, L, D) float64: `reference_matrix(module, q, k) @ v`."""
    return reference_matrix(module, q, k) @ v.double()


def _softmax_over(support: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` restricted to `support` (every row has its diagonal)."""
    return torch.softmax(scores.masked_fill(~support, -math.inf), dim=-1)


def _rows_normalised(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(-1, keepdim=True)


def _window(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool: i - window < j <= i."""
    i = torch.arange(length, device=device).unsqueeze(-1)
    j = torch.arange(length, device=device)
    return (j <= i) & (j > i - window)


def _features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(x) = m**-0.5 [exp(W x' - |x'|²/2), exp(-W x' - |x'|²/2)], x' = tau**0.5 x, directly."""
    x = x * x.shape[-1] ** -0.25
    wx = x @ projection.double().T
    half_norm = 0.5 * (x * x).sum(-1, keepdim=True)
    m = 2 * projection.shape[0]
    return torch.cat([torch.exp(wx - half_norm), torch.exp(-wx - half_norm)], dim=-1) / math.sqrt(m)


def _feature_products(q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(B, H, L, L): phi(q_i) . phi(k_j)."""
    return _features(q, projection) @ _features(k, projection).transpose(-1, -2)


def _buckets(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """(B, H, L) bucket of every row for one round: argmax over [x R, -x R]."""
    projected = x @ rotation.double()
    return torch.cat([projected, -projected], dim=-1).argmax(-1)


def _lsh_support(
    q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor, bucket_size: int
) -> torch.Tensor:
    """(B, H, L, L) bool: j == i, or, for some round, bucket(k_j) == bucket(q_i), j <= i, and at
    most bucket_size same-bucket keys in [j, i] (j itself included): the most recent ones."""
    length = q.shape[-2]
    past = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    support = torch.eye(length, dtype=torch.bool, device=q.device).expand(*q.shape[:2], -1, -1)
    for rotation in rotations:
        same = (_buckets(q, rotation).unsqueeze(-1) == _buckets(k, rotation).unsqueeze(-2)) & past
        between = same.flip(-1).cumsum(-1).flip(-1)  # same-bucket keys j' in [j, i]
        support = support | (same & (between <= bucket_size))
    return support
