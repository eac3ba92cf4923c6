"""Dense float64 definitions of every attention kind: the oracle for tests and `bench approx`.

A module is recognised by its `kind` name and read through its attributes and buffers; this file
imports no kernel.

Each returns the full (L x L) normalised attention matrix a module computes, built by brute force
from the module's own buffers (projection W, LSH rotations) and written independently of the fast
kernels: no chunks, no stabilisers, no sorting. Causal: rows sum to 1, entries above the diagonal
are 0. Non-causal (a module built with causal=False, optional key padding mask): columns of padded
keys are 0, rows of real queries sum to 1, rows of padded queries are 0 (their output is 0).
Cost O(L^2) memory: for tests and small benchmarks only.
Because a twin shares the module's random draws, it checks the kernels, not the draws:
tests/unit/test_estimators.py checks those (unbiased feature products, chi row lengths, orthogonal
blocks, LSH buckets, exact softmax).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def reference_matrix(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q, k: (B, H, L, D) -> (B, H, L, L) float64 attention matrix of `module`'s kind;
    key_padding_mask (B, L) bool, True for real tokens, for non-causal modules only. LSH buckets
    are drawn from `hash_qk` (shaped like q, k) when given, else from q and k."""
    q, k = q.double(), k.double()
    hash_q, hash_k = (q, k) if hash_qk is None else (x.double() for x in hash_qk)
    tau = q.shape[-1] ** -0.5
    scores = tau * q @ k.transpose(-1, -2)
    length = q.shape[-2]
    if not getattr(module, "causal", True):
        real = key_padding_mask
        if real is None:
            real = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
        return _bidirectional_matrix(module, q, k, scores, real, (hash_q, hash_k))
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask is for non-causal modules only")
    past = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    support = exact_support(module, q, k, (hash_q, hash_k))
    if module.kind in ("full", "local", "lsh"):
        return _softmax_over(support, scores)
    ahat = torch.where(support, scores.exp(), feature_products(q, k, module))
    return _rows_normalised(ahat * past)


def exact_support(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, H, L, L) bool: the keys a causal module scores exactly — full: every past key; local:
    its window; lsh: its buckets; scatterbrain: its window and/or buckets; performer: none. The
    other past keys get feature products (performer, scatterbrain) or no weight."""
    hash_q, hash_k = (q, k) if hash_qk is None else hash_qk
    batch, heads, length = q.shape[:3]
    device = q.device
    if module.kind == "full":
        return (
            torch.ones(length, length, dtype=torch.bool, device=device)
            .tril()
            .expand(batch, heads, -1, -1)
        )
    if module.kind == "lsh":
        return _lsh_support(hash_q, hash_k, module.rotations, module.bucket_size)
    if module.kind not in ("local", "performer", "scatterbrain"):
        raise TypeError(f"no reference for {type(module).__name__}")
    window = getattr(module, "window", 0)  # performer: none
    support = _window(length, window, device).expand(batch, heads, -1, -1)
    if getattr(module, "lsh", False):
        support = support | _lsh_support(hash_q, hash_k, module.rotations, module.bucket_size)
    return support


def reference_attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, H, L, D) each -> (B, H, L, D) float64: `reference_matrix(...) @ v`."""
    return reference_matrix(module, q, k, key_padding_mask, hash_qk) @ v.double()


def _bidirectional_matrix(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    scores: torch.Tensor,
    real: torch.Tensor,
    hashed: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The non-causal twin: every real key is visible; padded query rows are 0. LSH buckets are
    drawn from `hashed` (q, k or their unrotated content)."""
    length = q.shape[-2]
    visible = (real.unsqueeze(-1) & real.unsqueeze(-2)).unsqueeze(1)  # (B, 1, L, L)
    if module.kind == "full":
        support = visible
    elif module.kind == "local":
        support = _centred(length, module.window, q.device) & visible
    elif module.kind == "lsh":
        support = _two_sided_lsh_support(*hashed, real, module.rotations, module.bucket_size)
    elif module.kind == "performer":
        return _rows_normalised_or_zero(feature_products(q, k, module) * visible)
    elif module.kind == "scatterbrain":
        support = _centred(length, module.window, q.device).expand_as(scores)
        if module.lsh:
            lsh = _two_sided_lsh_support(*hashed, real, module.rotations, module.bucket_size)
            support = support | lsh
        ahat = torch.where(support, scores.exp(), feature_products(q, k, module))
        return _rows_normalised_or_zero(ahat * visible)
    else:
        raise TypeError(f"no reference for {type(module).__name__}")
    return _rows_normalised_or_zero(scores.exp() * (support & visible))


def _rows_normalised_or_zero(weights: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums; rows summing to 0 (padded queries) stay 0."""
    sums = weights.sum(-1, keepdim=True)
    return weights / torch.where(sums > 0, sums, 1.0)


def _centred(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool: -(window // 2) <= j - i <= (window - 1) // 2 (all False for window 0)."""
    i = torch.arange(length, device=device).unsqueeze(-1)
    j = torch.arange(length, device=device)
    return (j - i >= -(window // 2)) & (j - i <= (window - 1) // 2)


def _two_sided_lsh_support(
    q: torch.Tensor,
    k: torch.Tensor,
    real: torch.Tensor,
    rotations: torch.Tensor,
    bucket_size: int,
) -> torch.Tensor:
    """(B, H, L, L) bool: j == i, or, for some round, j is a real key of q_i's bucket with at most
    bucket_size - bucket_size // 2 real same-bucket keys in [j, i] (j <= i), or at most
    bucket_size // 2 in [i+1, j] (j > i); padded keys and padded queries' rows excluded."""
    length = q.shape[-2]
    behind, ahead = bucket_size - bucket_size // 2, bucket_size // 2
    past = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    support = torch.eye(length, dtype=torch.bool, device=q.device).expand(*q.shape[:2], -1, -1)
    for rotation in rotations:
        same = _buckets(q, rotation).unsqueeze(-1) == _buckets(k, rotation).unsqueeze(-2)
        same = same & real[:, None, None, :]
        before = same & past
        in_between = before.flip(-1).cumsum(-1).flip(-1)  # same-bucket real keys in [j, i]
        later = same & ~past
        up_to = later.cumsum(-1)  # same-bucket real keys in [i+1, j]
        support = support | (before & (in_between <= behind)) | (later & (up_to <= ahead))
    both_real = real.unsqueeze(-1) & real.unsqueeze(-2)
    return support & both_real.unsqueeze(1)


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


def _features(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """phi(x) of the module's map, directly, over the rows w of [W, -W], x' = tau**0.5 x:
    favor+ / simplex: m**-0.5 exp(w.x' - |x'|²/2); favor++: m**-0.5 (1+4A)**(D/4)
    exp(-A|w|² + (1+4A)**0.5 w.x' - |x'|²/2), A the root >= 0 of 16 D A² + (2 D - 4 S) A - S
    for the module's statistic S (found here as a polynomial root)."""
    d = x.shape[-1]
    x = x * d**-0.25
    w = torch.cat([module.projection.double(), -module.projection.double()])  # (m, D)
    a = 0.0
    if getattr(module, "features", "favor+") == "favor++":
        s = float(module.feature_stat)
        roots = np.roots([16.0 * d, 2.0 * d - 4.0 * s, -s])
        a = float(max(r.real for r in roots))
    log_phi = math.sqrt(1 + 4 * a) * (x @ w.T) - 0.5 * (x * x).sum(-1, keepdim=True)
    log_phi = log_phi - a * (w * w).sum(-1) + 0.25 * d * math.log(1 + 4 * a)
    return torch.exp(log_phi) / math.sqrt(w.shape[0])


def feature_products(q: torch.Tensor, k: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(B, H, L, L): phi(q_i) . phi(k_j) with the module's feature map."""
    return _features(q, module) @ _features(k, module).transpose(-1, -2)


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
