"""FAVOR+ positive random features and their causal (chunked, log-scaled) prefix sums.

`phi(x) = m**-0.5 [exp(W x' - |x'|²/2), exp(-W x' - |x'|²/2)]` with `x' = tau**0.5 x`, so that
`E[phi(q) . phi(k)] = exp(tau q . k)`. Everything here works on *log*-features `log phi(x)`.

Key features are kept on a per-feature running max over the chunks seen so far (like online
softmax): the state carried past chunk c is `Σ_j exp(log phi(k_j) - M_c) [v_j, 1]` and is rescaled
when `M` grows. `M` only ever covers keys a query is allowed to see, so a large future key cannot
push past keys into underflow. Query features are stabilised by their own max over features.
Non-causal sums (`bidirectional_feature_sum`) see every real key at once: one per-feature max
over the real keys of the sequence serves them.

Feature maps (`features` of performer and scatterbrain), all unbiased for `exp(tau q.k)`:

- `favor+`: the map above, W stacked orthogonal Gaussian blocks.
- `simplex`: the same map; within each block the row directions form a regular simplex (pairwise
  cosine -1/(D-1)) instead of an orthonormal basis, randomly rotated (simplex random features).
  Each row is still marginally Gaussian, so the estimate stays unbiased; negatively correlated
  directions lower its variance. Data-independent, so causal by construction.
- `favor++`: generalised positive features `phi(x) = m**-0.5 (1+4A)**(D/4) exp(-A|w|² +
  (1+4A)**0.5 w.x' - |x'|²/2)` over the rows ±w of W, unbiased for every fixed A > -1/4 (A = 0
  is FAVOR+). The A that minimises the variance of `phi(x).phi(y)` depends on `S = |x' + y'|²`
  (`optimal_a`); S is a per-module statistic `feature_stat`, a buffer saved with the model: a
  data-independent default (inputs with unit-variance entries) until `calibrate` sets it from
  queries and keys of *other* data (training blocks), never from the sequence being attended,
  so no position sees a statistic of its future.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sbtrain.attention.common import EMPTY, Part, chunked, combine, unchunked


class FeatureState(NamedTuple):
    """Prefix sums over keys: `nd` (B, H, m, D+1) = Σ_j exp(log phi(k_j) - max) [v_j, 1]^T;
    `max` (B, H, m): the per-feature log-scale (EMPTY before any key)."""

    nd: torch.Tensor
    max: torch.Tensor


FEATURES = ("favor+", "simplex", "favor++")


def check_feature_map(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


def fusable(features: str) -> bool:
    """Whether `features` is FAVOR+'s formula exp(W x' - |x'|²/2), the one the fused Triton
    kernels compute (favor+ and simplex differ only in how W is drawn); favor++ is not."""
    return features in ("favor+", "simplex")


def draw_projection(
    head_dim: int, n_features: int, generator: torch.Generator, features: str = "favor+"
) -> torch.Tensor:
    """W: (n_features/2, head_dim) fp32, stacked blocks of `head_dim` rows.

    favor+ and favor++: each block is the Q of a Gaussian (D, D) matrix, so its rows are
    orthonormal. simplex: each block is the D unit vertices of a regular simplex centred at 0
    (pairwise cosine -1/(D-1)) times a random rotation. Every row is then rescaled by the norm of
    an independent Gaussian vector, matching i.i.d. Gaussian rows in length while keeping the
    directions coupled (lower variance than i.i.d.).
    """
    rows = n_features // 2
    blocks = []
    if features == "simplex" and head_dim > 1:
        vertices = torch.eye(head_dim, dtype=torch.float64) - 1.0 / head_dim
        vertices = vertices / vertices.norm(dim=1, keepdim=True)  # (D, D), rows of a simplex
    for _ in range(math.ceil(rows / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        orthogonal, triangle = torch.linalg.qr(gaussian)
        if features == "simplex" and head_dim > 1:
            rotation = orthogonal * torch.sign(torch.diagonal(triangle))  # Haar-distributed
            blocks.append(vertices @ rotation.T)
        else:
            blocks.append(orthogonal.T)
    directions = torch.cat(blocks)[:rows]
    lengths = torch.randn(rows, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * lengths[:, None]).float()


def default_statistic(head_dim: int) -> float:
    """S = |x' + y'|² for independent inputs with unit-variance entries: 2 D tau = 2 D**0.5."""
    return 2.0 * head_dim**0.5


def input_statistic(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """The mean of S = |x' + y'|² over every (query, key) pair of q, k (..., D), x' = tau**0.5 x:
    mean|q'|² + mean|k'|² + 2 mean(q').mean(k'), a float64 scalar."""
    q = q.detach().double().flatten(0, -2) * tau**0.5
    k = k.detach().double().flatten(0, -2) * tau**0.5
    return (q * q).sum(-1).mean() + (k * k).sum(-1).mean() + 2 * q.mean(0) @ k.mean(0)


def optimal_a(statistic: float | torch.Tensor, head_dim: int) -> float | torch.Tensor:
    """The A minimising the second moment of favor++'s phi(x).phi(y) given S = |x' + y'|²:
    the root A >= 0 of 16 D A² + (2 D - 4 S) A - S = 0 (A = 0 when S = 0). A tensor S gives a
    tensor A on its device (no host synchronisation in the forward pass)."""
    d = float(head_dim)
    if isinstance(statistic, torch.Tensor):
        s = statistic.clamp_min(0.0)
        b = 2 * d - 4 * s
        return ((b * b + 64 * d * s).sqrt() - b) / (32 * d)
    s = max(float(statistic), 0.0)
    b = 2 * d - 4 * s
    return (math.sqrt(b * b + 64 * d * s) - b) / (32 * d)


def map_log_features(module, x: torch.Tensor) -> torch.Tensor:
    """log phi(x) of `module`'s map (its `features`, `projection`, `tau` and, for favor++,
    `feature_stat`)."""
    if module.features == "favor++":
        a = optimal_a(module.feature_stat, module.head_dim)
        return log_features(x, module.projection, module.tau, a)
    return log_features(x, module.projection, module.tau)


def log_features(
    x: torch.Tensor, projection: torch.Tensor, tau: float, a: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """log phi(x): (B, H, L, D) -> (B, H, L, m), m = 2 * projection rows, in x's dtype.

    a = 0: FAVOR+; a > -1/4 (a float, or a scalar tensor as favor++'s buffer gives): favor++'s
    generalised map with parameter A = a."""
    x = x * tau**0.5
    both = torch.cat([projection, -projection]).to(x.dtype)  # (m, D): one matmul for both halves
    offset = 0.5 * (x * x).sum(-1, keepdim=True) + 0.5 * math.log(both.shape[0])
    if not isinstance(a, torch.Tensor) and a == 0.0:
        return (x @ both.T).sub_(offset)  # (B, H, L, m)
    a = torch.as_tensor(a, dtype=torch.float64, device=x.device)
    # -A|w|² + (D/4) log(1 + 4A) per feature, the projection scaled by (1 + 4A)**0.5
    per_feature = a * (both * both).sum(-1) - 0.25 * x.shape[-1] * torch.log1p(4 * a)
    work = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 scale in fp32, fp64 in fp64
    scaled = (both.to(work) * (1 + 4 * a).sqrt().to(work)).to(x.dtype)
    return (x @ scaled.T).sub_(offset).sub_(per_feature.to(x.dtype))


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


class ChunkScan(NamedTuple):
    """Per-chunk key sums of `scan_chunks`, every one on a scale that only covers past chunks.
    M_c is the per-feature running max of key log-features over chunks <= c."""

    key_weights: torch.Tensor  # (B, H, N, C, m): exp(log phi(k) - M_c) for keys of chunk c
    before: torch.Tensor  # (B, H, N, m, E): state of the keys before chunk c, on scale M_{c-1}
    previous: torch.Tensor  # (B, H, N, m): M_{c-1} (the initial state's max for c = 0)
    running: torch.Tensor  # (B, H, N, m): M_c
    final: FeatureState  # after every chunk


def scan_chunks(lk_c: torch.Tensor, vx_c: torch.Tensor, state: FeatureState) -> ChunkScan:
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
    before, final = _ExclusiveScan.apply(per_chunk, growth, state.nd)
    return ChunkScan(key_weights, before, previous, running, FeatureState(final, running[:, :, -1]))


class _ExclusiveScan(torch.autograd.Function):
    """`before[c] = growth[c-1] * before[c-1] + x[c-1]`, `before[0] = initial`: a loop over chunks.

    As a Function, forward and backward are one fused op per chunk writing in place, instead of
    autograd's per-step slices that each materialise a zero tensor the size of `x`.
    """

    @staticmethod
    def forward(x: torch.Tensor, growth: torch.Tensor, initial: torch.Tensor):
        """x: (B, H, N, m, E); growth: (B, H, N, m, 1), constant; initial: (B, H, m, E).
        Returns before (B, H, N, m, E) and the state after the last chunk (B, H, m, E)."""
        before = torch.empty_like(x)
        before[:, :, 0] = initial
        last = x.shape[2] - 1
        for c in range(last):
            torch.addcmul(x[:, :, c], before[:, :, c], growth[:, :, c], out=before[:, :, c + 1])
        return before, torch.addcmul(x[:, :, last], before[:, :, last], growth[:, :, last])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_before: torch.Tensor, grad_final: torch.Tensor):
        # d loss / d x[c] is d loss / d (state after chunk c), accumulated backwards
        (growth,) = ctx.saved_tensors
        grad_x = torch.empty_like(grad_before)
        grad_x[:, :, -1] = grad_final
        for c in reversed(range(1, growth.shape[2])):
            torch.addcmul(
                grad_before[:, :, c], grad_x[:, :, c], growth[:, :, c], out=grad_x[:, :, c - 1]
            )
        grad_initial = torch.addcmul(grad_before[:, :, 0], grad_x[:, :, 0], growth[:, :, 0])
        return grad_x, None, grad_initial


def against_state(lq_c: torch.Tensor, scale: torch.Tensor, states: torch.Tensor) -> Part:
    """Queries `lq_c` (B, H, N, C, m) against per-chunk states (B, H, N, m, E) on log-scale `scale`
    (B, H, N, m); without the chunk dimension N, queries (B, H, T, m) against one state."""
    logits = lq_c + scale.unsqueeze(-2)
    top = logits.detach().amax(-1)  # (B, H, N, C)
    return Part(logits.sub_(top.unsqueeze(-1)).exp_() @ states, top)


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
    if length == 1:  # a decode step: fold its key in, then one product with the state
        state = fold(state, lk, vx)
        return against_state(lq, state.max, state.nd), state
    lq_c, vx_c = chunked(lq, chunk), chunked(vx, chunk)
    lk_c = chunked(lk, chunk, fill=EMPTY)  # padded keys get weight exp(EMPTY - M) = 0
    scan = scan_chunks(lk_c, vx_c, state)
    earlier = against_state(lq_c, scan.previous, scan.before)
    part = combine(earlier, _within_chunk(lq_c, lk_c, vx_c))
    return Part(unchunked(part.nd, length), unchunked(part.log_scale, length)), scan.final


def real_key_weights(lk: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal key features on one global scale: `exp(log phi(k) - M)` (B, H, L, m), exactly 0
    for padded keys, and M (B, H, m), the per-feature max over the real keys (EMPTY if none).

    A max over the whole sequence is fine when every real key is visible to every query; padded
    keys are excluded from it, so padding cannot flush real keys to zero.
    """
    lk = lk.masked_fill(~real[:, None, :, None], -math.inf)
    top = lk.detach().amax(-2).clamp_min(EMPTY)  # (B, H, m)
    return torch.exp(lk - top.unsqueeze(-2)), top


def bidirectional_feature_sum(
    lq: torch.Tensor, lk: torch.Tensor, vx: torch.Tensor, real: torch.Tensor
) -> Part:
    """Σ_j phi(q_i).phi(k_j) [v_j, 1] over every real key j, for every query.

    lq, lk: (B, H, L, m) log-features; vx: (B, H, L, E); real: (B, L) bool. One state
    Σ_j exp(log phi(k_j) - M) [v_j, 1]^T (B, H, m, E), no prefix sums: memory O(L m + m E).
    """
    key_weights, top = real_key_weights(lk, real)
    return against_state(lq, top, key_weights.transpose(-1, -2) @ vx)
