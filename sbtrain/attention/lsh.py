"""Causal angular-LSH attention: exact softmax over the most recent same-bucket keys.

Per hash round r, `bucket(x) = argmax([x R_r, -x R_r])` for queries and keys alike. Query i sees
`S_i` = itself plus, per round, the `bucket_size` most recent keys j <= i with
`bucket(k_j) == bucket(q_i)`; a key found by several rounds counts once. `S_i` is defined from
positions <= i only: keys are sorted by the code `bucket * L + j`, and the query's place among them
(`searchsorted` on `bucket(q_i) * L + i`) is preceded by exactly the same-bucket keys j <= i.
Sort-then-cut-in-equal-chunks (Reformer) would instead let future tokens decide what a query sees.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sbtrain.attention.common import (
    EMPTY,
    Part,
    cached_kv,
    check_seed,
    compute_dtype,
    full_precision,
    generator,
    normalise,
    resolve_seed,
    with_ones,
)

# Gathered rows per checkpointed query block: bounds the transient (T, K, D) tensors (~32 MiB fp32).
BLOCK_ELEMENTS = 2**23


def draw_rotations(
    head_dim: int, n_hashes: int, n_buckets: int, gen: torch.Generator
) -> torch.Tensor:
    """(n_hashes, head_dim, n_buckets/2) fp32 Gaussian random rotations, one per round."""
    return torch.randn(
        n_hashes, head_dim, n_buckets // 2, generator=gen, dtype=torch.float64
    ).float()


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (R, B, H, L) int64 buckets in [0, n_buckets): argmax of [xR, -xR]."""
    projected = torch.einsum("bhld,rdk->rbhlk", x, rotations.to(x.dtype))
    return torch.cat([projected, -projected], dim=-1).argmax(-1)


class KeyIndex(NamedTuple):
    """Keys sorted by (bucket, position), per round: `codes` = bucket * L + j, and `order` = j."""

    codes: torch.Tensor  # (R, B, H, L) int64, ascending
    order: torch.Tensor  # (R, B, H, L) int64


def index_keys(key_buckets: torch.Tensor) -> KeyIndex:
    """(R, B, H, L) key buckets -> the keys of every round sorted by (bucket, position)."""
    length = key_buckets.shape[-1]
    codes = key_buckets * length + torch.arange(length, device=key_buckets.device)
    codes, order = codes.sort(dim=-1)
    return KeyIndex(codes, order)


def lsh_support(
    query_buckets: torch.Tensor, positions: torch.Tensor, index: KeyIndex, bucket_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's support: itself and, per round, its `bucket_size` most recent same-bucket keys.

    query_buckets: (R, B, H, T) for queries at `positions` (T,) int64. Returns `keys`
    (B, H, T, 1 + R * bucket_size) int64 key positions, sorted, and `keep` (same shape, bool):
    False on repeats (a key found twice, or a round that found fewer than bucket_size keys, whose
    empty slots point at the query itself).
    """
    length = index.codes.shape[-1]
    query_codes = query_buckets * length + positions
    place = torch.searchsorted(index.codes, query_codes, right=True)  # keys with code <= query's
    back = place.unsqueeze(-1) - torch.arange(1, bucket_size + 1, device=place.device)
    inside = back >= 0
    flat = back.clamp_min(0).flatten(-2)  # (R, B, H, T * bucket_size)
    found_codes = index.codes.gather(-1, flat).view_as(back)
    found = index.order.gather(-1, flat).view_as(back)  # (R, B, H, T, bucket_size)
    same_bucket = inside & (found_codes >= (query_buckets * length).unsqueeze(-1))
    found = torch.where(same_bucket, found, positions.unsqueeze(-1))
    batch, heads, count = found.shape[1:4]
    itself = positions.view(1, 1, count, 1).expand(batch, heads, count, 1)
    keys = torch.cat([itself, found.permute(1, 2, 3, 0, 4).flatten(-2)], dim=-1)
    keys = keys.sort(dim=-1).values
    repeat = keys[..., 1:] == keys[..., :-1]
    keep = torch.cat([torch.ones_like(repeat[..., :1]), ~repeat], dim=-1)
    return keys, keep


class QueryFeatures(NamedTuple):
    """Random features of the queries, for scatterbrain's correction on LSH entries:
    `weights` (B, H, T, m) = exp(log phi(q) - top), `top` (B, H, T)."""

    weights: torch.Tensor
    top: torch.Tensor


class KeyFeatures(NamedTuple):
    """Same for the keys: `weights` (B, H, L, m) = exp(log phi(k) - top), `top` (B, H, L)."""

    weights: torch.Tensor
    top: torch.Tensor


def _gather(table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rows of `table` (B, H, L, X) at `keys` (B, H, T, K) -> (B, H, T, K, X)."""
    batch, heads, length, width = table.shape
    offsets = torch.arange(batch * heads, device=keys.device).view(batch, heads, 1, 1) * length
    rows = table.reshape(batch * heads * length, width).index_select(0, (keys + offsets).flatten())
    return rows.view(*keys.shape, width)


def _weigh(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_k weights (B, H, T, K) * values (B, H, T, K, E) -> (B, H, T, E)."""
    return (weights.unsqueeze(-2) @ values).squeeze(-2)


def _block(
    q: torch.Tensor,
    table: torch.Tensor,
    keys: torch.Tensor,
    keep: torch.Tensor,
    head_dim: int,
    value_width: int,
    query_features: QueryFeatures | None,
) -> tuple[torch.Tensor, ...]:
    """One query block: exact part (and the feature products to subtract) over the support.

    q: (B, H, T, D) scaled; table: (B, H, L, D + E [+ m + 1]) = [k, vx, key feature weights, top].
    Returns (nd, log_scale) of the exact part, then (nd, log_scale) of Σ phi(q).phi(k) [v, 1] over
    the same entries when `query_features` is given.
    """
    rows = _gather(table, keys)  # (B, H, T, K, X)
    k, vx = rows[..., :head_dim], rows[..., head_dim : head_dim + value_width]
    scores = (k @ q.unsqueeze(-1)).squeeze(-1).masked_fill(~keep, -math.inf)  # (B, H, T, K)
    top = scores.detach().amax(-1).clamp_min(EMPTY)  # EMPTY when nothing is kept
    exact = (_weigh(torch.exp(scores - top.unsqueeze(-1)), vx), top)
    if query_features is None:
        return exact
    kf = rows[..., head_dim + value_width : -1]  # (B, H, T, K, m)
    key_top = rows[..., -1].detach().masked_fill(~keep, -math.inf)
    products = (kf @ query_features.weights.unsqueeze(-1)).squeeze(-1)  # (B, H, T, K)
    feature_top = key_top.amax(-1).clamp_min(EMPTY)
    weights = products * torch.exp(key_top - feature_top.unsqueeze(-1))
    return (*exact, _weigh(weights, vx), query_features.top + feature_top)


def lsh_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    vx: torch.Tensor,
    rotations: torch.Tensor,
    bucket_size: int,
    older_than: int = 0,
    features: tuple[QueryFeatures, KeyFeatures] | None = None,
) -> tuple[Part, Part | None]:
    """Exact `exp(q.k)` over each query's LSH support, and optionally the feature products there.

    q: (B, H, T, D), already multiplied by the temperature: the *last* T positions of the keys
    k (B, H, L, D) and values vx (B, H, L, E). `older_than` > 0 keeps only support keys
    j <= i - older_than (scatterbrain: the window already covers the others). Query blocks run
    under activation checkpointing, so backward keeps O(L K) indices, not the gathered
    (L, K, D) rows. Returns the exact part (B, H, T, E) and, with `features`, the part
    Σ phi(q).phi(k) [v, 1] over the same entries (for the low-rank part to subtract).
    """
    (batch, heads, count, dim), length = q.shape, k.shape[-2]
    positions = torch.arange(length - count, length, device=q.device)
    with torch.no_grad():
        query_buckets = hash_buckets(q, rotations)  # argmax ignores the positive temperature
        index = index_keys(hash_buckets(k, rotations))
    columns = [k, vx]
    if features is not None:
        columns += [features[1].weights, features[1].top.unsqueeze(-1)]
    table = torch.cat(columns, dim=-1)  # (B, H, L, X)
    support = 1 + rotations.shape[0] * bucket_size
    block = max(1, BLOCK_ELEMENTS // (batch * heads * support * table.shape[-1]))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, table))
    outputs = []
    for start in range(0, count, block):
        span = slice(start, start + block)
        keys, keep = lsh_support(query_buckets[..., span], positions[span], index, bucket_size)
        if older_than:
            keep &= keys <= positions[span].unsqueeze(-1) - older_than
        query_features = None
        if features is not None:
            query_features = QueryFeatures(*(t[:, :, span] for t in features[0]))
        args = (q[:, :, span], table, keys, keep, dim, vx.shape[-1], query_features)
        outputs.append(checkpoint(_block, *args, use_reentrant=False) if grad else _block(*args))
    joined = [torch.cat(pieces, dim=2) for pieces in zip(*outputs)]
    exact = Part(joined[0], joined[1])
    return exact, (Part(joined[2], joined[3]) if features is not None else None)


def check_lsh(n_hashes: int, bucket_size: int, n_buckets: int) -> None:
    """The checks every kind with an LSH part shares."""
    for name, value in (("n_hashes", n_hashes), ("bucket_size", bucket_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(
            f"n_buckets must be an even integer >= 2 (argmax over [xR, -xR]), got {n_buckets!r}"
        )


class LSHAttention(nn.Module):
    """Exact softmax over `S_i`: itself plus, per round, the `bucket_size` most recent keys j <= i
    in the query's bucket (deduplicated across rounds).

    Time O(L K D + R L log L), K = 1 + n_hashes * bucket_size; memory O(L K) (query blocks are
    checkpointed). Decoding keeps every key and value (the support can reach arbitrarily far back).
    """

    def __init__(
        self,
        head_dim: int,
        n_hashes: int = 2,
        bucket_size: int = 64,
        n_buckets: int = 16,
        seed: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.n_hashes = n_hashes
        self.bucket_size = bucket_size
        self.n_buckets = n_buckets
        self.tau = head_dim**-0.5
        shape = (n_hashes, head_dim, n_buckets // 2)
        self.register_buffer("rotations", torch.empty(shape), persistent=True)
        self.redraw(resolve_seed(seed))

    @staticmethod
    def check_options(
        head_dim: int,
        n_hashes: int = 2,
        bucket_size: int = 64,
        n_buckets: int = 16,
        seed: int | None = None,
    ) -> None:
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        check_lsh(n_hashes, bucket_size, n_buckets)
        check_seed(seed)

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new rotations from `seed` (never called automatically)."""
        drawn = draw_rotations(self.head_dim, self.n_hashes, self.n_buckets, generator(seed))
        self.rotations.copy_(drawn)

    def forward_parts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Part:
        """q: (B, H, T, D), the last T positions of k, v (B, H, L, D) -> part (B, H, T, D+1)."""
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return lsh_parts(q * self.tau, k, with_ones(v), self.rotations, self.bucket_size)[0]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype."""
        with full_precision(q):
            return normalise(self.forward_parts(q, k, v)).to(v.dtype)

    def decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """The next T tokens (B, H, T, D) after those in `cache` -> (out (B, H, T, D), cache).

        The cache keeps all keys and values; only the T new queries are computed.
        """
        context_k, context_v = cached_kv(cache, k, v)
        all_k, all_v = torch.cat([context_k, k], dim=-2), torch.cat([context_v, v], dim=-2)
        with full_precision(q):
            out = normalise(self.forward_parts(q, all_k, all_v)).to(v.dtype)
        return out, {"k": all_k, "v": all_v}
