"""Scatterbrain: exact softmax on a sparse support, Performer features for the rest of the past.

`Ahat[i, j] = exp(tau q_i.k_j)` for j in S_i, `phi(q_i).phi(k_j)` for the other j <= i, and
`out_i = Σ_j Ahat[i, j] v_j / Σ_j Ahat[i, j]`. S_i is the local window (i - window, i], and/or the
LSH support (the query itself plus its most recent same-bucket keys per round, see lsh.py).

With a window the low-rank part covers exactly j <= i - window, computed with chunks aligned to
the window (no subtraction). LSH entries outside the window are moved from the low-rank part to
the exact part: their feature products are subtracted and their exact scores added. Every part
is a (numerator, denominator, log-scale) triple, added on one shared log-scale.

Non-causal (`causal=False`, with a key padding mask): the same over every *real* key j, S_i the
centred window (j - i in [-(window // 2), (window - 1) // 2]) and/or the two-sided LSH support
(lsh.py). The window part meets key chunks c-1, c, c+1 exactly and through features, and the other
chunks through prefix and suffix sums of per-chunk states on one per-feature max over the real
keys (no subtraction); LSH entries outside the window are moved as in the causal case.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from sbtrain.attention import dispatch
from sbtrain.attention.common import (
    EMPTY,
    Options,
    Part,
    cached_kv,
    causal_only,
    check_seed,
    chunked,
    combine,
    compute_dtype,
    full_precision,
    generator,
    normalise,
    real_tokens,
    resolve_seed,
    shifted,
    subtract,
    unchunked,
    with_ones,
)
from sbtrain.attention.features import (
    FeatureState,
    against_state,
    bidirectional_feature_sum,
    causal_feature_sum,
    draw_projection,
    empty_state,
    fold,
    map_log_features,
    real_key_weights,
    scan_chunks,
)
from sbtrain.attention.local import (
    NEIGHBOURS,
    centred_inside,
    centred_scores,
    exact_part,
    key_bias,
    window_scores,
)
from sbtrain.attention.lsh import (
    KeyFeatures,
    QueryFeatures,
    check_lsh,
    draw_rotations,
    hashed_context,
    lsh_parts,
)
from sbtrain.attention.performer import (
    check_features,
    init_feature_map,
    state_from_cache,
    state_to_cache,
)

SPARSE = ("local", "lsh", "local+lsh")
DEFAULTS = {"window": 128, "n_hashes": 2, "bucket_size": 64, "n_buckets": 16, "chunk_size": 64}
LSH_OPTIONS = ("n_hashes", "bucket_size", "n_buckets")


@dataclass(frozen=True)
class ScatterbrainOptions(Options):
    sparse: str = "local"  # the exact part: local | lsh | local+lsh
    window: int | None = None  # local: the most recent keys seen exactly (0: none)
    n_features: int = 128  # random features for every other key, both halves counted
    chunk_size: int | None = None  # without a window: chunk of the causal prefix sums
    n_hashes: int | None = None  # lsh: hash rounds
    bucket_size: int | None = None  # lsh: most recent same-bucket keys per round
    n_buckets: int | None = None  # lsh: buckets per round
    seed: int | None = None  # of the projection and rotations (default: the global torch RNG)
    features: str = "favor+"  # the feature map: favor+ | simplex | favor++

    def checked(self, head_dim: int) -> ScatterbrainOptions:
        """The options `sparse` uses, defaults filled in (window 0 without a local part, the
        chunk aligned to the window with one); ValueError for those it cannot use."""
        super().checked(head_dim)
        if self.sparse not in SPARSE:
            raise ValueError(
                f"scatterbrain: sparse must be one of {', '.join(SPARSE)}, got {self.sparse!r}"
            )
        parts = self.sparse.split("+")
        unused = [] if "local" in parts else ["window"]
        if "lsh" not in parts:
            unused += LSH_OPTIONS
        given = sorted(name for name in unused if getattr(self, name) is not None)
        if given:
            raise ValueError(
                f"scatterbrain with sparse={self.sparse!r} does not use {', '.join(given)}"
            )
        resolved = {
            name: DEFAULTS[name] if getattr(self, name) is None else getattr(self, name)
            for name in DEFAULTS
            if name not in unused
        }
        window = resolved.setdefault("window", 0)
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(
                f"scatterbrain: window must be an integer >= 0 (0: no exact window), got {window!r}"
            )
        if window and self.chunk_size is not None:
            raise ValueError(
                "scatterbrain: chunk_size is not an option with a local window "
                "(the low-rank chunks are aligned to the window); leave it unset"
            )
        if not self.causal and not window and self.chunk_size is not None:
            raise ValueError(
                "scatterbrain: chunk_size only applies to causal attention (non-causal sums "
                "over all keys at once); leave it unset"
            )
        if window:
            resolved["chunk_size"] = window
        check_features(head_dim, self.n_features, resolved["chunk_size"], self.features)
        if "lsh" in parts:
            check_lsh(resolved["n_hashes"], resolved["bucket_size"], resolved["n_buckets"])
        check_seed(self.seed)
        return dataclasses.replace(self, **resolved)


class ScatterbrainAttention(nn.Module):
    """Exact scores on the window and/or LSH support, random features (`features`: favor+,
    simplex or favor++, see features.py) on every other past key.

    window 0 (with sparse=local) leaves no exact part: the same as Performer with the same W.
    Time O(L (window (D + m) + m D + K (D + m))), memory O(L (window + m) + L/window m D), plus
    with LSH O(L R) indices and one block of gathered rows (K = support size, R = n_hashes).
    """

    kind = "scatterbrain"
    Options = ScatterbrainOptions

    def __init__(self, head_dim: int, **options):
        super().__init__()
        o = self.Options(**options).checked(head_dim)
        self.head_dim = head_dim
        self.causal = o.causal
        self.sparse = o.sparse
        self.n_features = o.n_features
        self.window = o.window
        self.chunk_size = o.chunk_size
        self.lsh = "lsh" in o.sparse
        self.tau = head_dim**-0.5
        self.impl = "auto"  # fused kernels or PyTorch path: see dispatch.py (not a checkpoint's)
        init_feature_map(self, o.features)
        if self.lsh:
            self.n_hashes, self.bucket_size, self.n_buckets = o.n_hashes, o.bucket_size, o.n_buckets
            shape = (self.n_hashes, head_dim, self.n_buckets // 2)
            self.register_buffer("rotations", torch.empty(shape), persistent=True)
        self.redraw(resolve_seed(o.seed))

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw a new projection W (and LSH rotations) from `seed` (by the trainer every
        train.redraw_interval updates, if set)."""
        gen = generator(seed)
        self.projection.copy_(draw_projection(self.head_dim, self.n_features, gen, self.features))
        if self.lsh:
            self.rotations.copy_(draw_rotations(self.head_dim, self.n_hashes, self.n_buckets, gen))

    @full_precision
    def _run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: dict | None,
        keep_cache: bool,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[Part, dict | None]:
        """Parts for new queries q (B, H, T, D) after the tokens in `cache`, and the next cache.
        With LSH, buckets are drawn from `hash_qk` (new queries, new keys) when given."""
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        context_k, context_v = cached_kv(cache, k, v)
        all_k, all_v = torch.cat([context_k, k], dim=-2), torch.cat([context_v, v], dim=-2)
        state = state_from_cache(cache)
        lq = map_log_features(self, q)
        lk = map_log_features(self, all_k)  # (B, H, n + T, m)
        vx = with_ones(all_v)
        if self.window:
            part, state = self._windowed(q, all_k, lq, lk, vx, state, keep_cache)
        else:
            seen = context_k.shape[-2]
            lk_new, vx_new = lk[:, :, seen:], vx[:, :, seen:]
            part, state = causal_feature_sum(lq, lk_new, vx_new, self.chunk_size, state)
        if self.lsh:
            hashed = hashed_context(cache, hash_qk)
            part = self._with_lsh(part, q, all_k, vx, lq, lk, None, hashed)
        if not keep_cache:
            return part, None
        cache = self._next_cache(state, all_k, all_v)
        if self.lsh and hash_qk is not None:
            cache["hash_k"] = hashed[1]
        return part, cache

    def _windowed(
        self,
        q: torch.Tensor,
        all_k: torch.Tensor,
        lq: torch.Tensor,
        lk: torch.Tensor,
        vx: torch.Tensor,
        state: FeatureState | None,
        keep_cache: bool,
    ) -> tuple[Part, FeatureState | None]:
        """`window_part` for the last T = len(q) of n + T keys, and the state for the next call.

        `state` holds every key before the last window - 1 cached ones. One new query sees all
        cached keys exactly; for more, the cached keys get dummy zero queries in front of q,
        whose outputs are dropped.
        """
        count, total, window = q.shape[-2], all_k.shape[-2], self.window
        start = max(0, total - count - (window - 1))
        dummies = total - count - start
        lk, vx = lk[:, :, start:], vx[:, :, start:]
        state = state if state is not None else empty_state(lk, vx)
        if count == 1:  # a decode step: exact on the cached keys and its own, features before
            exact = exact_part(q * self.tau, all_k[:, :, start:], vx)
            part = combine(exact, against_state(lq, state.max, state.nd))
        else:
            if dummies:
                q = torch.cat([q.new_zeros(*q.shape[:2], dummies, q.shape[-1]), q], dim=-2)
                lq = torch.cat([lq.new_zeros(*lq.shape[:2], dummies, lq.shape[-1]), lq], dim=-2)
            part = window_part(q * self.tau, all_k[:, :, start:], vx, lq, lk, window, state)
            part = Part(part.nd[:, :, dummies:], part.log_scale[:, :, dummies:])
        if keep_cache:
            leaving = max(0, lk.shape[-2] - (window - 1))
            state = fold(state, lk[:, :, :leaving], vx[:, :, :leaving])
        return part, state

    def _next_cache(self, state: FeatureState, all_k: torch.Tensor, all_v: torch.Tensor) -> dict:
        cache = state_to_cache(state)
        if self.lsh:
            cache.update(k=all_k, v=all_v)
        elif self.window:
            start = max(0, all_k.shape[-2] - (self.window - 1))
            cache.update(k=all_k[:, :, start:], v=all_v[:, :, start:])
        return cache

    @full_precision
    def _bidirectional(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        real: torch.Tensor,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Part:
        """The non-causal part for q, k, v (B, H, L, D) and real tokens (B, L)."""
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        lq, lk = map_log_features(self, q), map_log_features(self, k)
        vx = with_ones(v)
        if self.window:
            part = centred_window_part(q * self.tau, k, vx, lq, lk, self.window, real)
        else:
            part = bidirectional_feature_sum(lq, lk, vx, real)
        if self.lsh:
            part = self._with_lsh(part, q, k, vx, lq, lk, real, hash_qk)
        return part

    def _with_lsh(
        self,
        part: Part,
        q: torch.Tensor,
        k: torch.Tensor,
        vx: torch.Tensor,
        lq: torch.Tensor,
        lk: torch.Tensor,
        real: torch.Tensor | None,
        hashed: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> Part:
        """`part` with its LSH support outside the window moved from features to exact scores:
        their feature products subtracted, their exact scores added (causal: real is None)."""
        features = (_weights(lq, QueryFeatures), _weights(lk, KeyFeatures))
        exact, products = lsh_parts(
            q * self.tau,
            k,
            vx,
            self.rotations,
            self.bucket_size,
            self.window,
            features,
            real=real,
            hashed=hashed,
        )
        return combine(subtract(part, products), exact)

    def forward_parts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Part:
        """(B, H, L, D) each -> the unnormalised part (fp32, or fp64 for fp64 inputs)."""
        real = real_tokens(self.causal, key_padding_mask, q)
        if real is not None:
            return self._bidirectional(q, k, v, real, hash_qk)
        return self._run(q, k, v, None, keep_cache=False, hash_qk=hash_qk)[0]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype; key_padding_mask (B, L) bool,
        True for real tokens (non-causal only): padded keys get no weight in any part, padded
        queries output 0. With LSH, buckets are drawn from `hash_qk` (the unrotated q, k) when
        given; without LSH it is ignored. Causal sparse=local with a `fusable` feature map: the
        fused Triton kernels or the PyTorch path, as `self.impl` (auto | pytorch | fused) and
        dispatch.py decide; the rest takes the PyTorch path."""
        real = real_tokens(self.causal, key_padding_mask, q)
        if real is not None:
            return normalise(self.forward_parts(q, k, v, real, hash_qk), real).to(v.dtype)
        # None: no kernel for LSH supports or for this feature map
        window = self.window if self.fusable and not self.lsh else None
        pytorch = functools.partial(self.pytorch_forward, hash_qk=hash_qk)
        return dispatch.attention(self.impl, q, k, v, self.projection, window, pytorch)

    def pytorch_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The causal PyTorch path of `forward` (the fused kernels' reference)."""
        return normalise(self.forward_parts(q, k, v, hash_qk=hash_qk)).to(v.dtype)

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

        The cache holds the low-rank state (keys older than the window folded in) and the last
        window - 1 keys and values; with LSH it keeps every key and value instead (the support can
        reach arbitrarily far back), but still computes only the T new queries.
        """
        causal_only(self)
        part, cache = self._run(q, k, v, cache, keep_cache=keep_cache, hash_qk=hash_qk)
        return normalise(part).to(v.dtype), cache


def window_part(
    q: torch.Tensor,
    k: torch.Tensor,
    vx: torch.Tensor,
    lq: torch.Tensor,
    lk: torch.Tensor,
    window: int,
    state: FeatureState,
) -> Part:
    """Exact `exp(q.k)` on (i - window, i] plus `phi(q).phi(k)` on j <= i - window, one scale.

    q: (B, H, L, D) multiplied by the temperature; k: (B, H, L, D); vx: (B, H, L, E); lq, lk:
    (B, H, L, m) log-features; `state` holds keys older than the whole sequence. Chunks are
    aligned to the window: query chunk c gets exact scores against chunks c-1 (strict upper
    triangle) and c (lower triangle), and features against the state of chunks <= c-2 plus the
    lower triangle, diagonal included, of chunk c-1: no subtraction. Feature scales are the running
    max over chunks <= c-1, all in chunk c's past. One per-query log-scale (the max of exact
    scores and feature logits) serves every term, so the parts add without rescaling.
    Returns the part (B, H, L, E).
    """
    length = q.shape[-2]
    q_c, k_c, vx_c, lq_c = (chunked(x, window) for x in (q, k, vx, lq))
    scan = scan_chunks(chunked(lk, window, fill=EMPTY), vx_c, state)
    # state before chunk c-1 on scale M_{c-1}; for chunk 0, the initial state
    rescaled = scan.before * torch.exp(scan.previous - scan.running).unsqueeze(-1)
    older = torch.cat([state.nd.unsqueeze(2), rescaled[:, :, :-1]], dim=2)  # (B, H, N, m, E)
    previous, current = window_scores(q_c, k_c)  # (B, H, N, W, W) each
    logits = lq_c + scan.previous.unsqueeze(-2)  # (B, H, N, W, m)
    tops = [x.detach().amax(-1) for x in (previous, current, logits)]
    top = torch.maximum(torch.maximum(tops[0], tops[1]), tops[2]).unsqueeze(-1)
    query_weights = logits.sub_(top).exp_()
    near = query_weights @ shifted(scan.key_weights).transpose(-1, -2)  # (B, H, N, W, W)
    lower = torch.ones(window, window, dtype=q.dtype, device=q.device).tril()
    previous_weights = torch.addcmul(previous.sub_(top).exp_(), near, lower)
    nd = query_weights @ older + previous_weights @ shifted(vx_c)
    nd = nd + current.sub_(top).exp_() @ vx_c  # (B, H, N, W, E)
    return Part(unchunked(nd, length), unchunked(top.squeeze(-1), length))


def centred_window_part(
    q: torch.Tensor,
    k: torch.Tensor,
    vx: torch.Tensor,
    lq: torch.Tensor,
    lk: torch.Tensor,
    window: int,
    real: torch.Tensor,
) -> Part:
    """Non-causal: exact `exp(q.k)` on the centred window plus `phi(q).phi(k)` on every other
    real key, one scale.

    q: (B, H, L, D) multiplied by the temperature; k: (B, H, L, D); vx: (B, H, L, E); lq, lk:
    (B, H, L, m) log-features; real: (B, L) bool. Chunks are aligned to the window: query chunk c
    gets exact scores inside the window and feature products outside it against chunks c-1, c,
    c+1 (three (W, W) blocks), and features against the sums of chunks <= c-2 and >= c+2 (an
    exclusive prefix and suffix of per-chunk states, on the per-feature max over the real keys):
    every real key exactly once, no subtraction. Padded keys have score -inf and feature 0.
    Returns the part (B, H, L, E); memory O(L (window + m) + L/window m E).
    """
    length = q.shape[-2]
    key_weights, key_top = real_key_weights(lk, real)  # (B, H, L, m), (B, H, m)
    q_c, k_c, vx_c, lq_c, kw_c = (chunked(x, window) for x in (q, k, vx, lq, key_weights))
    per_chunk = kw_c.transpose(-1, -2) @ vx_c  # (B, H, N, m, E)
    before = shifted(shifted(per_chunk.cumsum(2)))  # chunks <= c-2
    after = shifted(shifted(per_chunk.flip(2).cumsum(2).flip(2), by=-1), by=-1)  # >= c+2
    blocks = centred_scores(q_c, k_c, key_bias(real, window, q))  # 3 x (B, H, N, W, W)
    logits = lq_c + key_top[:, :, None, None, :]  # (B, H, N, W, m)
    tops = [x.detach().amax(-1) for x in (*blocks, logits)]
    top = torch.stack(tops).amax(0).unsqueeze(-1)  # finite: the logits are
    query_weights = logits.sub_(top).exp_()
    nd = query_weights @ (before + after)
    for by, block, inside in zip(NEIGHBOURS, blocks, centred_inside(window, q)):
        near = query_weights @ shifted(kw_c, by=by).transpose(-1, -2)  # (B, H, N, W, W)
        weights = torch.addcmul(block.sub_(top).exp_(), near, (~inside).to(q.dtype))
        nd = nd + weights @ shifted(vx_c, by=by)
    return Part(unchunked(nd, length), unchunked(top.squeeze(-1), length))


def _weights(logits: torch.Tensor, kind: type) -> QueryFeatures | KeyFeatures:
    """Features exp(log phi - top) with top = max over features (B, H, L), as `kind`."""
    top = logits.detach().amax(-1)
    return kind(torch.exp(logits - top.unsqueeze(-1)), top)
