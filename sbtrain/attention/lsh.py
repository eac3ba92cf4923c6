"""Angular-LSH attention: exact softmax over the nearest same-bucket keys.

Per hash round r, `bucket(x) = argmax([x R_r, -x R_r])` for queries and keys alike. Query i sees
`S_i` = itself plus, per round, the `bucket_size` most recent keys j <= i with
`bucket(k_j) == bucket(q_i)`; a key found by several rounds counts once. `S_i` is defined from
positions <= i only: keys are sorted by the code `bucket * L + j`, and the query's place among them
(`searchsorted` on `bucket(q_i) * L + i`) is preceded by exactly the same-bucket keys j <= i.
Sort-then-cut-in-equal-chunks (Reformer) would instead let future tokens decide what a query sees.

Non-causal (with a key padding mask): per round, the `bucket_size - bucket_size // 2` nearest
same-bucket *real* keys j <= i and the `bucket_size // 2` nearest j > i, in position order. Padded
keys are sorted after every real key, so neither the padding of the query's own sequence nor that
of any other sequence changes which keys a real query sees.

Two ways to the exact sums over those supports (`lsh_parts`), by query blocks: gathering each
query's K support rows [k, v, 1, (features)], recomputed in backward (memory O(L) whatever L:
long contexts), or, for short sequences, dense scores q @ k^T (B, H, T, L) of which only the
support entries are kept. Gathering K x X floats per query moves more memory than L dense scores
when L is short: at the CPU LRA shapes (L = 256 / 400, K = 33 / 49) the dense path is 2.4x
faster under load (1.1-1.7x with one thread); `dense_is_cheaper` chooses (measurements there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from sbtrain.attention.common import (
    EMPTY,
    Options,
    Part,
    cached_kv,
    causal_only,
    centred,
    check_seed,
    compute_dtype,
    full_precision,
    generator,
    normalise,
    real_tokens,
    resolve_seed,
    with_ones,
)

# Gathered elements per query block (16 MiB in fp32). Blocks stay under glibc's largest mmap
# threshold (32 MiB), so their buffers are reused from the heap instead of faulting in fresh pages
# every block, which measured several times slower on CPU.
BLOCK_ELEMENTS = 2**22

# The path of the exact sums: None chooses by `dense_is_cheaper`; True / False force the dense /
# gathered one (tests).
DENSE: bool | None = None
DENSE_FACTOR = 10
DENSE_MAX_LENGTH = 1024


def dense_is_cheaper(length: int, support_size: int) -> bool:
    """Whether dense masked scores beat gathering support rows, for L keys and supports of
    K = `support_size`.

    Per query, the dense path computes L scores and L weights x [v, 1] (and feature products) in
    BLAS matmuls and touches only its K support entries otherwise; the gathered path copies K
    rows of X = D + E (+ m + 1) columns in, and in backward adds K such rows of gradients back
    (index_add), with the small batched matmuls of K rows. Both are O(K X) or O(L X) per query,
    so the choice is L <= c K. Measured (fwd + bwd, fp32, non-causal with padding, B=32, H=4,
    D=16, 2-core CPU under a load of ~7, both paths side by side, one run each; gathered ->
    dense): lsh L=256, 2 x 16 (L / K = 7.8): 8.2 -> 3.5 s (one thread: 0.69 -> 0.61 s);
    L=400, 2 x 24 (L / K = 8.2): 17.3 -> 7.2 s (1.68 -> 1.44 s); scatterbrain (sparse=lsh,
    16 features) L=256: 13.0 -> 5.5 s (1.04 -> 0.63 s); L=400 (one thread): 4.2 -> 2.6 s.
    B=1, H=8, D=64, 2 x 128 at L=2048 (L / K = 8.0, one thread, an earlier version of the
    dense path): 39.6 -> 3.7 s. Faster wherever L / K ~ 8 was tried, hence c = 10 (not
    measured beyond). Under load the time is mostly a fixed cost per parallel op (threads
    waiting for each other), so fewer ops (the dense path has no index_add) matter most.
    Training recipes/lra/listops-cpu-lsh.yaml (same load, updates 2-4): 14.2 -> 6.0 s/update.
    Lengths over DENSE_MAX_LENGTH keep the gathered path regardless: the long-context runs were
    measured with it, and the dense path's work per query grows with L, not with K.
    """
    return length <= DENSE_MAX_LENGTH and length <= DENSE_FACTOR * support_size


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
    """Keys sorted by (bucket, position), per round: `codes` = bucket * L + j, and `order` = j.
    Padded keys (non-causal) get the code PADDED, after every real key: no query finds them."""

    codes: torch.Tensor  # (R, B, H, L) int64, ascending
    order: torch.Tensor  # (R, B, H, L) int64


PADDED = 2**62  # the code of a padded key: above bucket * L + j for every real one


def index_keys(key_buckets: torch.Tensor, real: torch.Tensor | None = None) -> KeyIndex:
    """(R, B, H, L) key buckets -> the keys of every round sorted by (bucket, position); with
    `real` (B, L) bool, padded keys are sorted after all real ones."""
    length = key_buckets.shape[-1]
    codes = key_buckets * length + torch.arange(length, device=key_buckets.device)
    if real is not None:
        codes = codes.masked_fill(~real[:, None, :], PADDED)
    codes, order = codes.sort(dim=-1)
    return KeyIndex(codes, order)


def lsh_support(
    query_buckets: torch.Tensor,
    positions: torch.Tensor,
    index: KeyIndex,
    bucket_size: int,
    ahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's support: itself and, per round, its `bucket_size` nearest same-bucket keys
    j <= i and (non-causal) its `ahead` nearest same-bucket keys j > i, in position order.

    query_buckets: (R, B, H, T) for queries at `positions` (T,) int64. Returns `keys`
    (B, H, T, 1 + R * (bucket_size + ahead)) int64 key positions, sorted, and `keep` (same
    shape, bool): False on repeats (a key found twice, or a round that found fewer keys, whose
    empty slots point at the query itself).
    """
    length = index.codes.shape[-1]
    query_codes = query_buckets * length + positions
    place = torch.searchsorted(index.codes, query_codes, right=True)  # keys with code <= query's
    device = place.device
    steps = torch.cat(
        [-torch.arange(1, bucket_size + 1, device=device), torch.arange(ahead, device=device)]
    )
    near = place.unsqueeze(-1) + steps  # sorted places: bucket_size before, `ahead` from place on
    inside = (near >= 0) & (near < length)
    flat = near.clamp(0, length - 1).flatten(-2)  # (R, B, H, T * steps)
    found_codes = index.codes.gather(-1, flat).view_as(near)
    found = index.order.gather(-1, flat).view_as(near)  # (R, B, H, T, steps)
    found_buckets = found_codes.div(length, rounding_mode="floor")
    same_bucket = inside & (found_buckets == query_buckets.unsqueeze(-1))
    found = torch.where(same_bucket, found, positions.unsqueeze(-1))
    batch, heads, count = found.shape[1:4]
    itself = positions.view(1, 1, count, 1).expand(batch, heads, count, 1)
    keys = torch.cat([itself, found.permute(1, 2, 3, 0, 4).flatten(-2)], dim=-1)
    keys = keys.sort(dim=-1).values
    repeat = keys[..., 1:] == keys[..., :-1]
    keep = torch.cat([torch.ones_like(repeat[..., :1]), ~repeat], dim=-1)
    return keys, keep


def split_bucket(bucket_size: int) -> tuple[int, int]:
    """Non-causal LSH: (same-bucket keys taken at j <= i, at j > i) per round, `bucket_size` in
    all: the larger half before, like the centred window."""
    return bucket_size - bucket_size // 2, bucket_size // 2


class QueryFeatures(NamedTuple):
    """Random features of the queries, for scatterbrain's correction on LSH entries:
    `weights` (B, H, T, m) = exp(log phi(q) - top), `top` (B, H, T)."""

    weights: torch.Tensor
    top: torch.Tensor


class KeyFeatures(NamedTuple):
    """Same for the keys: `weights` (B, H, L, m) = exp(log phi(k) - top), `top` (B, H, L)."""

    weights: torch.Tensor
    top: torch.Tensor


class _Support(NamedTuple):
    """What decides the support of any block of queries (integers only, no gradients)."""

    query_buckets: torch.Tensor  # (R, B, H, T)
    positions: torch.Tensor  # (T,) int64
    index: KeyIndex
    bucket_size: int  # same-bucket keys j <= i per round
    ahead: int  # same-bucket keys j > i per round (non-causal)
    window: int  # keys a window covers are left out: j > i - window, or the centred window
    real: torch.Tensor | None  # (B, L) bool (non-causal), None for causal

    def block(self, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`lsh_support` of the queries in `span`, without the window's keys and padded keys."""
        positions = self.positions[span]
        keys, keep = lsh_support(
            self.query_buckets[..., span], positions, self.index, self.bucket_size, self.ahead
        )
        if self.window and self.real is None:
            keep &= keys <= positions.unsqueeze(-1) - self.window
        elif self.window:
            before, after = centred(self.window)
            offsets = keys - positions.unsqueeze(-1)
            keep &= (offsets < -before) | (offsets > after)
        if self.real is not None:
            length = self.real.shape[-1]
            rows = torch.arange(self.real.shape[0], device=keys.device).view(-1, 1, 1, 1) * length
            keep &= self.real.flatten()[keys + rows]
        return keys, keep


def _flat_rows(keys: torch.Tensor, length: int) -> torch.Tensor:
    """Key positions (B, H, T, K) -> row numbers in a (B * H * length, X) table, flattened."""
    batch, heads = keys.shape[:2]
    offsets = torch.arange(batch * heads, device=keys.device).view(batch, heads, 1, 1) * length
    return (keys + offsets).flatten()


def _weigh(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_k weights (B, H, T, K) * values (B, H, T, K, E) -> (B, H, T, E)."""
    return (weights.unsqueeze(-2) @ values).squeeze(-2)


class _BlockSums(NamedTuple):
    weights: torch.Tensor  # (B, H, T, K) exp(score - top), 0 off the support
    nd: torch.Tensor  # (B, H, T, E)
    top: torch.Tensor  # (B, H, T)
    decay: torch.Tensor | None  # (B, H, T, K) exp(key feature top - feature_top)
    feature_weights: torch.Tensor | None  # (B, H, T, K) phi(q).phi(k) / exp(q top + feature_top)
    feature_nd: torch.Tensor | None
    feature_top: torch.Tensor | None


def _exp_below_top(x: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(x - top), top) over the last axis of a fresh `x` (B, H, T, K), changed in place:
    entries `dropped` weigh 0 and `top` is their max over the others (EMPTY with none)."""
    x.masked_fill_(dropped, -math.inf)
    top = x.amax(-1).clamp_min(EMPTY)
    return x.sub_(top.unsqueeze(-1)).exp_(), top


def _block_sums(
    q: torch.Tensor,
    qf: torch.Tensor | None,
    rows: torch.Tensor,
    keep: torch.Tensor,
    dim: int,
    width: int,
) -> _BlockSums:
    """Sums of one query block over its gathered support rows [k, vx, kf, key feature top].

    q: (B, H, T, D) scaled; qf: (B, H, T, m) query feature weights or None; rows:
    (B, H, T, K, X) with k = rows[..., :dim], vx the next `width`; keep: (B, H, T, K).
    A query with nothing kept gets the EMPTY log-scale.
    """
    k, vx = rows[..., :dim], rows[..., dim : dim + width]
    dropped = ~keep
    weights, top = _exp_below_top((k @ q.unsqueeze(-1)).squeeze(-1), dropped)  # (B, H, T, K)
    nd = _weigh(weights, vx)
    if qf is None:
        return _BlockSums(weights, nd, top, None, None, None, None)
    kf = rows[..., dim + width : -1]  # (B, H, T, K, m)
    decay, feature_top = _exp_below_top(rows[..., -1].clone(), dropped)
    feature_weights = (kf @ qf.unsqueeze(-1)).squeeze(-1) * decay
    return _BlockSums(
        weights, nd, top, decay, feature_weights, _weigh(feature_weights, vx), feature_top
    )


class _SupportSums(torch.autograd.Function):
    """Exact sums (and feature-product sums) over every query's support, by query blocks.

    Gathered rows (T, K, X) never outlive their block: backward gathers them again and adds each
    block's key gradients into one buffer, like FlashAttention's backward. (Checkpointing each
    block instead makes every block's backward allocate a key gradient of the full length:
    quadratic in L.) Memory O(L X) plus one block; log-scales are outputs without gradients.
    """

    @staticmethod
    def forward(ctx, q, qf, table, support: _Support, dim: int, width: int, block: int):
        """q: (B, H, T, D); qf: (B, H, T, m) or None; table: (B, H, L, X) = [k, vx, kf, top]
        with vx of `width` columns. Returns nd (B, H, T, E), top (B, H, T), feature_nd and
        feature_top (empty without qf)."""
        batch, heads, count, _ = q.shape
        nd = q.new_empty(batch, heads, count, width)
        top = q.new_empty(batch, heads, count)
        feature_nd = torch.empty_like(nd) if qf is not None else q.new_empty(0)
        feature_top = torch.empty_like(top) if qf is not None else q.new_empty(0)
        for span, rows, _, keep in _blocks(table, support, count, block):
            qf_block = None if qf is None else qf[:, :, span]
            sums = _block_sums(q[:, :, span], qf_block, rows, keep, dim, width)
            nd[:, :, span], top[:, :, span] = sums.nd, sums.top
            if qf is not None:
                feature_nd[:, :, span], feature_top[:, :, span] = sums.feature_nd, sums.feature_top
        ctx.save_for_backward(q, qf, table)
        ctx.support, ctx.dim, ctx.width, ctx.block = support, dim, width, block
        ctx.mark_non_differentiable(top, feature_top)
        return nd, top, feature_nd, feature_top

    @staticmethod
    def backward(ctx, grad_nd, _grad_top, grad_feature_nd, _grad_feature_top):
        q, qf, table = ctx.saved_tensors
        dim, width = ctx.dim, ctx.width
        grad_q = torch.zeros_like(q)
        grad_qf = torch.zeros_like(qf) if qf is not None else None
        grad_table = torch.zeros_like(table).view(-1, table.shape[-1])
        values = slice(dim, dim + width)
        for span, rows, rows_index, keep in _blocks(table, ctx.support, q.shape[2], ctx.block):
            q_block, qf_block = q[:, :, span], None if qf is None else qf[:, :, span]
            sums = _block_sums(q_block, qf_block, rows, keep, dim, width)
            # every column of grad_rows is written (the key feature top has no gradient)
            grad_rows = torch.empty_like(rows)  # (B, H, T, K, X)
            gradient = grad_nd[:, :, span].unsqueeze(-2)  # (B, H, T, 1, E)
            torch.mul(sums.weights.unsqueeze(-1), gradient, out=grad_rows[..., values])
            grad_scores = (rows[..., values] * gradient).sum(-1) * sums.weights  # (B, H, T, K)
            grad_q[:, :, span] = _weigh(grad_scores, rows[..., :dim])
            torch.mul(grad_scores.unsqueeze(-1), q_block.unsqueeze(-2), out=grad_rows[..., :dim])
            if qf is not None:
                gradient = grad_feature_nd[:, :, span].unsqueeze(-2)
                grad_rows[..., values].addcmul_(sums.feature_weights.unsqueeze(-1), gradient)
                grad_products = (rows[..., values] * gradient).sum(-1) * sums.decay
                features = slice(dim + width, -1)
                grad_qf[:, :, span] = _weigh(grad_products, rows[..., features])
                torch.mul(
                    grad_products.unsqueeze(-1),
                    qf_block.unsqueeze(-2),
                    out=grad_rows[..., features],
                )
                grad_rows[..., -1] = 0
            grad_table.index_add_(0, rows_index, grad_rows.view(-1, table.shape[-1]))
        return grad_q, grad_qf, grad_table.view_as(table), None, None, None, None


def _blocks(table: torch.Tensor, support: _Support, count: int, block: int):
    """Per query block: (span, gathered rows (B, H, T, K, X), their flat row numbers, keep)."""
    flat_table = table.reshape(-1, table.shape[-1])
    for start in range(0, count, block):
        span = slice(start, start + block)
        keys, keep = support.block(span)
        rows_index = _flat_rows(keys, table.shape[2])
        yield span, flat_table.index_select(0, rows_index).view(*keys.shape, -1), rows_index, keep


class _DenseSums(torch.autograd.Function):
    """The same sums as `_SupportSums`, with dense matmuls instead of gathered rows.

    Per query block: the scores q @ k^T (B, H, T, L); the support's K scores are picked from
    them, weighed exactly as `_block_sums` weighs them, and spread back (zero off the support)
    into a (B, H, T, L) matrix for `weights @ vx`. Matmuls cover L keys per query, masks and
    exponentials only the K support entries (an exponential of a masked -inf score is ~30x
    slower than of a finite one on CPU). Forward keeps each query's support (int32) and its K
    weights for backward, which adds each block's key gradients into (B, H, L, .) buffers:
    memory O(L (X + K)) plus one block (the path serves L <= DENSE_MAX_LENGTH only). Keeping
    them instead of recomputing the support and q @ k^T in backward measured 1.15-1.3x faster
    (fwd + bwd, B=32, H=4, L=256, D=16, 2 x 16 non-causal with padding, 2-core CPU, quiet:
    ~112 -> ~85-98 ms, two runs each).
    """

    @staticmethod
    def forward(ctx, q, qf, k, vx, kf, key_top, support: _Support, block: int):
        """q: (B, H, T, D); k: (B, H, L, D); vx: (B, H, L, E); qf (B, H, T, m), kf (B, H, L, m)
        and key_top (B, H, L) for the feature products, or all three None. Returns what
        `_SupportSums.forward` does."""
        nd = q.new_empty(*q.shape[:-1], vx.shape[-1])
        top = q.new_empty(q.shape[:-1])
        feature_nd = torch.empty_like(nd) if qf is not None else q.new_empty(0)
        feature_top = torch.empty_like(top) if qf is not None else q.new_empty(0)
        saved = []  # per block: keys (int32), weights, and with features decay, feature weights
        for span, reach in _dense_spans(support, q.shape[2], k.shape[2], block):
            keys, keep = support.block(span)
            qf_block = None if qf is None else qf[:, :, span]
            sums = _dense_weights(q[:, :, span], qf_block, k, kf, key_top, keys, ~keep, reach)
            nd[:, :, span] = _spread(sums.weights, keys, reach) @ vx[:, :, :reach]
            top[:, :, span] = sums.top
            saved.append([keys.to(torch.int32), sums.weights])
            if qf is not None:
                spread = _spread(sums.feature_weights, keys, reach)
                feature_nd[:, :, span] = spread @ vx[:, :, :reach]
                feature_top[:, :, span] = sums.feature_top
                saved[-1] += [sums.decay, sums.feature_weights]
        blocks = [torch.cat(column, dim=2) for column in zip(*saved)]
        ctx.save_for_backward(q, qf, k, vx, kf, *blocks)
        ctx.support, ctx.block = support, block
        ctx.mark_non_differentiable(top, feature_top)
        return nd, top, feature_nd, feature_top

    @staticmethod
    def backward(ctx, grad_nd, _grad_top, grad_feature_nd, _grad_feature_top):
        q, qf, k, vx, kf, all_keys, all_weights, *features = ctx.saved_tensors
        # contiguous, whatever the inputs' strides: `_add_product` views them (B * H, L, X)
        grad_q, grad_k, grad_vx = (x.new_zeros(x.shape) for x in (q, k, vx))
        grad_qf = qf.new_zeros(qf.shape) if qf is not None else None
        grad_kf = kf.new_zeros(kf.shape) if qf is not None else None
        for span, reach in _dense_spans(ctx.support, q.shape[2], k.shape[2], ctx.block):
            keys, weights = all_keys[:, :, span].long(), all_weights[:, :, span]
            q_block, qf_block = q[:, :, span], None if qf is None else qf[:, :, span]
            near = slice(0, reach)
            vx_t = vx[:, :, near].transpose(-1, -2)
            gradient = grad_nd[:, :, span]  # (B, H, T, E)
            _add_product(grad_vx[:, :, near], _spread(weights, keys, reach), gradient)
            grad_scores = (gradient @ vx_t).gather(-1, keys).mul_(weights)  # (B, H, T, K)
            grad_scores = _spread(grad_scores, keys, reach)
            grad_q[:, :, span] = grad_scores @ k[:, :, near]
            _add_product(grad_k[:, :, near], grad_scores, q_block)
            if qf is not None:
                decay, feature_weights = (x[:, :, span] for x in features)
                gradient = grad_feature_nd[:, :, span]
                _add_product(grad_vx[:, :, near], _spread(feature_weights, keys, reach), gradient)
                grad_products = (gradient @ vx_t).gather(-1, keys).mul_(decay)
                grad_products = _spread(grad_products, keys, reach)
                grad_qf[:, :, span] = grad_products @ kf[:, :, near]
                _add_product(grad_kf[:, :, near], grad_products, qf_block)
        # the key feature top, like every log-scale, has no gradient
        return grad_q, grad_qf, grad_k, grad_vx, grad_kf, None, None, None


def _add_product(buffer: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> None:
    """buffer (B, H, L, X) += weights (B, H, T, L)^T @ rows (B, H, T, X), in one BLAS call
    (`buffer` may be a slice of keys of a contiguous (B, H, ., X) tensor)."""
    batch, heads, length, width = buffer.shape
    flat = buffer.view(batch * heads, length, width)
    flat.baddbmm_(weights.transpose(-1, -2).flatten(0, 1), rows.flatten(0, 1))


def _dense_spans(support: _Support, count: int, length: int, block: int):
    """Per query block: (span, reach): its support holds keys j < reach only (causal: up to its
    last query; non-causal: all L)."""
    for start in range(0, count, block):
        stop = min(start + block, count)
        yield slice(start, stop), length if support.real is not None else length - count + stop


def _spread(values: torch.Tensor, keys: torch.Tensor, reach: int) -> torch.Tensor:
    """(B, H, T, K) values at key positions `keys` -> (B, H, T, reach), zero elsewhere. Added, so
    a repeated key (value 0: not kept) leaves its first copy's value alone."""
    spread = values.new_zeros(*values.shape[:-1], reach)
    return spread.scatter_add_(-1, keys, values)


def _dense_weights(
    q: torch.Tensor,
    qf: torch.Tensor | None,
    k: torch.Tensor,
    kf: torch.Tensor | None,
    key_top: torch.Tensor | None,
    keys: torch.Tensor,
    dropped: torch.Tensor,
    reach: int,
) -> _BlockSums:
    """`_block_sums`' weights (B, H, T, K) of one query block, its scores picked from q @ k^T
    over the keys j < reach; `dropped` = ~keep (nd and feature_nd are left None)."""
    near = slice(0, reach)
    scores = (q @ k[:, :, near].transpose(-1, -2)).gather(-1, keys)
    weights, top = _exp_below_top(scores, dropped)
    if qf is None:
        return _BlockSums(weights, None, top, None, None, None, None)
    near_top = key_top[:, :, None, near].expand(*keys.shape[:-1], reach).gather(-1, keys)
    decay, feature_top = _exp_below_top(near_top, dropped)
    products = (qf @ kf[:, :, near].transpose(-1, -2)).gather(-1, keys)
    return _BlockSums(weights, None, top, decay, products.mul_(decay), None, feature_top)


def lsh_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    vx: torch.Tensor,
    rotations: torch.Tensor,
    bucket_size: int,
    window: int = 0,
    features: tuple[QueryFeatures, KeyFeatures] | None = None,
    real: torch.Tensor | None = None,
    hashed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Part, Part | None]:
    """Exact `exp(q.k)` over each query's LSH support, and optionally the feature products there.

    q: (B, H, T, D), already multiplied by the temperature: the *last* T positions of the keys
    k (B, H, L, D) and values vx (B, H, L, E). `window` > 0 leaves out the keys a window covers
    (scatterbrain: they are exact already): causal, j > i - window; non-causal, the centred
    window. `real` (B, L) bool makes it non-causal (T = L): `split_bucket(bucket_size)` keys per
    round before and after, padded keys never found. A query with an empty support (only a padded
    one can have it) gets the EMPTY log-scale and zero sums. Queries are processed in blocks:
    gathered (T, K, X) rows recomputed in backward, memory O(L (X + R)) plus one block; or, when
    `dense_is_cheaper` (or `DENSE` forces it), dense (T, L) scores whose K supported weights are
    kept for backward, memory O(L (X + R + K)) plus one block. Returns the
    exact part (B, H, T, E) and, with `features`, the part Σ phi(q).phi(k) [v, 1] over the same
    entries (for the low-rank part to subtract).
    `hashed` = (queries (B, H, T, D), keys (B, H, L, D)) are what buckets are drawn from when
    q and k carry rotary positions: their unrotated content (default: q and k themselves).
    """
    (batch, heads, count, dim), length = q.shape, k.shape[-2]
    positions = torch.arange(length - count, length, device=q.device)
    behind, ahead = (bucket_size, 0) if real is None else split_bucket(bucket_size)
    with torch.no_grad():
        hash_q, hash_k = (q, k) if hashed is None else (x.to(q.dtype) for x in hashed)
        query_buckets = hash_buckets(hash_q, rotations)  # argmax ignores a positive scale
        index = index_keys(hash_buckets(hash_k, rotations), real)
    support = _Support(query_buckets, positions, index, behind, ahead, window, real)
    qf, kf, key_top = (None,) * 3 if features is None else (features[0].weights, *features[1])
    support_size = 1 + rotations.shape[0] * (behind + ahead)
    if dense_is_cheaper(length, support_size) if DENSE is None else DENSE:
        block = max(1, BLOCK_ELEMENTS // (batch * heads * length))
        sums = _DenseSums.apply(q, qf, k, vx, kf, key_top, support, block)
    else:
        columns = [k, vx] if features is None else [k, vx, kf, key_top.unsqueeze(-1)]
        table = torch.cat(columns, dim=-1)  # (B, H, L, X)
        block = max(1, BLOCK_ELEMENTS // (batch * heads * support_size * table.shape[-1]))
        sums = _SupportSums.apply(q, qf, table, support, dim, vx.shape[-1], block)
    nd, top, feature_nd, feature_top = sums
    if features is None:
        return Part(nd, top), None
    return Part(nd, top), Part(feature_nd, features[0].top + feature_top)


def hashed_context(
    cache: dict | None, hash_qk: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decoding: what the new queries and every key so far are hashed from (the cache's
    `hash_k` first), or None when q and k are hashed themselves."""
    if hash_qk is None:
        return None
    hash_q, hash_k = hash_qk
    if cache is not None and "hash_k" in cache:
        hash_k = torch.cat([cache["hash_k"], hash_k], dim=-2)
    return hash_q, hash_k


def check_lsh(n_hashes: int, bucket_size: int, n_buckets: int) -> None:
    """The checks every kind with an LSH part shares."""
    for name, value in (("n_hashes", n_hashes), ("bucket_size", bucket_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(
            f"n_buckets must be an even integer >= 2 (argmax over [xR, -xR]), got {n_buckets!r}"
        )


@dataclass(frozen=True)
class LSHOptions(Options):
    n_hashes: int = 2  # hash rounds
    bucket_size: int = 64  # most recent same-bucket keys a query sees per round
    n_buckets: int = 16  # buckets per round (even: argmax over [xR, -xR])
    seed: int | None = None  # of the rotations (default: drawn from the global torch RNG)

    def checked(self, head_dim: int) -> LSHOptions:
        check_lsh(self.n_hashes, self.bucket_size, self.n_buckets)
        check_seed(self.seed)
        return super().checked(head_dim)


class LSHAttention(nn.Module):
    """Exact softmax over `S_i`: itself plus, per round, the `bucket_size` most recent keys j <= i
    in the query's bucket (deduplicated across rounds).

    Time O(L K D + R L log L), K = 1 + n_hashes * bucket_size; memory O(L (D + R)) plus one block
    of gathered rows (recomputed in backward). Decoding keeps every key and value (the support can
    reach arbitrarily far back) and computes only the new queries.
    """

    kind = "lsh"
    Options = LSHOptions

    def __init__(self, head_dim: int, **options):
        super().__init__()
        o = self.Options(**options).checked(head_dim)
        self.head_dim = head_dim
        self.causal = o.causal
        self.n_hashes, self.bucket_size, self.n_buckets = o.n_hashes, o.bucket_size, o.n_buckets
        self.tau = head_dim**-0.5
        shape = (o.n_hashes, head_dim, o.n_buckets // 2)
        self.register_buffer("rotations", torch.empty(shape), persistent=True)
        self.redraw(resolve_seed(o.seed))

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new rotations from `seed` (automatically only on train.redraw_interval)."""
        drawn = draw_rotations(self.head_dim, self.n_hashes, self.n_buckets, generator(seed))
        self.rotations.copy_(drawn)

    @full_precision
    def forward_parts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Part:
        """q: (B, H, T, D), the last T positions of k, v (B, H, L, D) -> part (B, H, T, D+1)
        (non-causal: T = L). Buckets are drawn from `hash_qk` (shaped like q, k) when given,
        else from q and k."""
        real = real_tokens(self.causal, key_padding_mask, q)
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        rotations, bucket_size = self.rotations, self.bucket_size
        vx = with_ones(v)
        return lsh_parts(q * self.tau, k, vx, rotations, bucket_size, real=real, hashed=hash_qk)[0]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype; key_padding_mask (B, L) bool, True
        for real tokens (non-causal only): padded keys are never in a support, padded queries
        output 0. `hash_qk`: the unrotated (q, k) that buckets are drawn from when q and k carry
        rotary positions."""
        real = real_tokens(self.causal, key_padding_mask, q)
        return normalise(self.forward_parts(q, k, v, key_padding_mask, hash_qk), real).to(v.dtype)

    def decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: dict | None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_cache: bool = True,
    ) -> tuple[torch.Tensor, dict | None]:
        """The next T tokens (B, H, T, D) after those in `cache` -> (out (B, H, T, D), cache);
        the cache None with `keep_cache=False` (context parallelism needs the outputs only).

        The cache keeps all keys and values (and, with `hash_qk`, the keys' hash inputs); only
        the T new queries are computed.
        """
        causal_only(self)
        context_k, context_v = cached_kv(cache, k, v)
        all_k, all_v = torch.cat([context_k, k], dim=-2), torch.cat([context_v, v], dim=-2)
        hashed = hashed_context(cache, hash_qk)
        out = normalise(self.forward_parts(q, all_k, all_v, hash_qk=hashed)).to(v.dtype)
        cache = {"k": all_k, "v": all_v}
        if hashed is not None:
            cache["hash_k"] = hashed[1]
        return out, cache if keep_cache else None
