"""FAVOR+ positive random features and their causal (chunked, log-scaled) prefix sums.

`phi(x) = m**-0.5 [exp(W x' - |x'|²/2), exp(-W x' - |x'|²/2)]` with `x' = tau**0.5 x`, so that
`E[phi(q) . phi(k)] = exp(tau q . k)`. Everything here works on *log*-features `log phi(x)`.

Key features are kept on a per-feature running max over the chunks seen so far (like online
softmax): the state carried past chunk c is `Σ_j exp(log phi(k_j) - M_c) [v_j, 1]` and is rescaled
when `M` grows. `M` only ever covers keys a query is allowed to see, so a large future key cannot
push past keys into underflow. Query features are stabilised by their own max over features.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sbtrain.attention.common import EMPTY, Part, chunked, combine, shifted, unchunked


class FeatureState(NamedTuple):
    """Prefix sums over keys: `nd` (B, H, m, D+1) = Σ_j exp(log phi(k_j) - max) [v_j, 1]^T;
    `max` (B, H, m): the per-feature log-scale (EMPTY before any key)."""

    nd: torch.Tensor
    max: torch.Tensor


def draw_projection(head_dim: int, n_features: int, generator: torch.Generator) -> torch.Tensor:
    """W: (n_features/2, head_dim) fp32, stacked orthogonal Gaussian blocks (FAVOR+).

    Each block is the Q of a Gaussian (D, D) matrix, so its rows are orthonormal; every row is
    then rescaled by the norm of an independent Gaussian vector, matching i.i.d. Gaussian rows in
    length while keeping the directions orthogonal (lower variance than i.i.d.).
    """
    rows = n_features // 2
    blocks = []
    for _ in range(math.ceil(rows / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        orthogonal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthogonal.T)
    directions = torch.cat(blocks)[:rows]
    lengths = torch.randn(rows, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * lengths[:, None]).float()


def log_features(x: torch.Tensor, projection: torch.Tensor, tau: float) -> torch.Tensor:
    """log phi(x): (B, H, L, D) -> (B, H, L, m), m = 2 * projection rows, in x's dtype."""
    x = x * tau**0.5
    wx = x @ projection.to(x.dtype).T  # (B, H, L, m/2)
    offset = 0.5 * (x * x).sum(-1, keepdim=True) + 0.5 * math.log(2 * projection.shape[0])
    return torch.cat([wx, -wx], dim=-1) - offset


def empty_state(lk: torch.Tensor, vx: torch.Tensor) -> FeatureState:
    """The state before any key, for log-features `lk` (B, H, *, m) and values `vx` (B, H, *, E)."""
    batch, heads, _, m = lk.shape
    return FeatureState(
        lk.new_zeros(batch, heads, m, vx.shape[-1]), lk.new_full((batch, heads, m), EMPTY)
    )


def fold(state: FeatureState, lk: torch.Tensor, vx: torch.Tensor) -> FeatureState:
    """Add keys `lk` (B, H, T, m) with values `vx` (B, H, T, E) to `state` (rescaling it)."""
    if lk.shape[-2] == 0:
        return state
    new_max = torch.maximum(state.max, lk.detach().amax(-2))  # (B, H, m)
    weights = torch.exp(lk - new_max.unsqueeze(-2))  # (B, H, T, m), all <= 1
    nd = state.nd * torch.exp(state.max - new_max).unsqueeze(-1) + weights.transpose(-1, -2) @ vx
    return FeatureState(nd, new_max)


class _Scan(NamedTuple):
    key_weights: (
        torch.Tensor
    )  # (B, H, N, C, m): exp(log phi(k) - M_c), M_c = running max up to chunk c
    before: torch.Tensor  # (B, H, N, m, E): state of the keys before chunk c, on scale M_{c-1}
    previous: torch.Tensor  # (B, H, N, m): M_{c-1} (the initial state's max for c = 0)
    running: torch.Tensor  # (B, H, N, m): M_c
    final: FeatureState  # after every chunk


def _scan(lk_c: torch.Tensor, vx_c: torch.Tensor, state: FeatureState) -> _Scan:
    """Exclusive scan of per-chunk key sums `lk_c` (B, H, N, C, m), `vx_c` (B, H, N, C, E).

    The loop runs over chunks, not positions: each step rescales the carried state to the new
    running max and adds one chunk's sum.
    """
    chunk_max = lk_c.detach().amax(-2)  # (B, H, N, m)
    running = torch.cummax(torch.maximum(chunk_max, state.max.unsqueeze(2)), dim=2).values
    previous = torch.cat([state.max.unsqueeze(2), running[:, :, :-1]], dim=2)
    key_weights = torch.exp(lk_c - running.unsqueeze(-2))
    per_chunk = key_weights.transpose(-1, -2) @ vx_c  # (B, H, N, m, E)
    growth = torch.exp(previous - running).unsqueeze(-1)  # (B, H, N, m, 1), <= 1
    nd = state.nd
    before = []
    for c in range(lk_c.shape[2]):
        before.append(nd)
        nd = nd * growth[:, :, c] + per_chunk[:, :, c]
    final = FeatureState(nd, running[:, :, -1])
    return _Scan(key_weights, torch.stack(before, dim=2), previous, running, final)


def _against_state(lq_c: torch.Tensor, scale: torch.Tensor, states: torch.Tensor) -> Part:
    """Queries `lq_c` (B, H, N, C, m) against per-chunk states (B, H, N, m, E) on log-scale `scale`
    (B, H, N, m). Returns the part and the query weights exp(lq + scale - top) (B, H, N, C, m)."""
    logits = lq_c + scale.unsqueeze(-2)
    top = logits.detach().amax(-1)  # (B, H, N, C)
    weights = torch.exp(logits - top.unsqueeze(-1))
    return Part(weights @ states, top), weights


def _within_chunk(lq_c: torch.Tensor, lk_c: torch.Tensor, vx_c: torch.Tensor) -> Part:
    """Causal sum inside each chunk, j <= i, on scales that only see keys j <= i.

    A chunk-wide key max would look ahead inside the chunk, so each key is scaled by its own max
    over features s_j, and each query by the running max r_i = max_{j <= i} s_j; the ratio
    exp(s_j - r_i) <= 1 is a constant mask-like factor.
    """
    key_top = lk_c.detach().amax(-1)  # s_j (B, H, N, C)
    reach = torch.cummax(key_top, dim=-1).values  # r_i
    query_top = lq_c.detach().amax(-1)
    qf = torch.exp(lq_c - query_top.unsqueeze(-1))  # (B, H, N, C, m)
    kf = torch.exp(lk_c - key_top.unsqueeze(-1))
    size = lq_c.shape[-2]
    future = torch.ones(size, size, dtype=torch.bool, device=lq_c.device).triu(1)
    decay = (key_top.unsqueeze(-2) - reach.unsqueeze(-1)).masked_fill(future, -math.inf).exp()
    scores = (qf @ kf.transpose(-1, -2)) * decay  # (B, H, N, C, C)
    return Part(scores @ vx_c, query_top + reach)


def causal_feature_sum(
    lq: torch.Tensor,
    lk: torch.Tensor,
    vx: torch.Tensor,
    chunk: int,
    state: FeatureState | None = None,
) -> tuple[Part, FeatureState]:
    """Σ_{j <= i} phi(q_i).phi(k_j) [v_j, 1] for every query, after the keys already in `state`.

    lq, lk: (B, H, L, m) log-features; vx: (B, H, L, E). Chunked: each chunk sees the carried
    state of earlier chunks plus a masked intra-chunk block; memory O(L (m + chunk) + L/chunk m E).
    Returns the part (B, H, L, E) and the state after all L keys.
    """
    length = lq.shape[-2]
    state = state if state is not None else empty_state(lk, vx)
    lq_c, vx_c = chunked(lq, chunk), chunked(vx, chunk)
    lk_c = chunked(lk, chunk, fill=EMPTY)  # padded keys get weight exp(EMPTY - M) = 0
    scan = _scan(lk_c, vx_c, state)
    earlier, _ = _against_state(lq_c, scan.previous, scan.before)
    part = combine(earlier, _within_chunk(lq_c, lk_c, vx_c))
    return Part(unchunked(part.nd, length), unchunked(part.log_scale, length)), scan.final


def windowed_feature_sum(
    lq: torch.Tensor,
    lk: torch.Tensor,
    vx: torch.Tensor,
    window: int,
    state: FeatureState | None = None,
) -> Part:
    """Σ_{j <= i - window} phi(q_i).phi(k_j) [v_j, 1]: the keys that left the local window.

    Chunks of size `window`: query chunk c sees the state of chunks <= c-2 plus the lower
    triangle (diagonal included) of chunk c-1, all on the running max M_{c-1} of keys in chunks
    <= c-1, which are all in every such query's past. No subtraction. Keys in `state` count as
    older than the whole sequence. lq, lk: (B, H, L, m); vx: (B, H, L, E) -> part (B, H, L, E).
    """
    length = lq.shape[-2]
    state = state if state is not None else empty_state(lk, vx)
    lq_c, vx_c = chunked(lq, window), chunked(vx, window)
    lk_c = chunked(lk, window, fill=EMPTY)
    scan = _scan(lk_c, vx_c, state)
    # state before chunk c-1, on M_{c-1}; for chunk 0 that is the initial state
    rescaled = scan.before * torch.exp(scan.previous - scan.running).unsqueeze(-1)
    older = torch.cat([state.nd.unsqueeze(2), rescaled[:, :, :-1]], dim=2)  # (B, H, N, m, E)
    far, query_weights = _against_state(lq_c, scan.previous, older)
    previous_keys = shifted(scan.key_weights)  # chunk 0 gets zero weights: there is no chunk -1
    near = torch.tril(query_weights @ previous_keys.transpose(-1, -2)) @ shifted(vx_c)
    return Part(unchunked(far.nd + near, length), unchunked(far.log_scale, length))
