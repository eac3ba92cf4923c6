"""Exact softmax over a sliding window: query i sees keys j in (i - window, i] (causal), or the
`window` keys centred on i, j - i in [-(window // 2), (window - 1) // 2] (non-causal)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sbtrain.attention.common import (
    EMPTY,
    Options,
    Part,
    cached_kv,
    causal_only,
    centred,
    chunked,
    compute_dtype,
    full_precision,
    normalise,
    positive_int,
    real_tokens,
    shifted,
    unchunked,
    with_ones,
)


def window_bias(
    n_chunks: int, window: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks (0 or -inf) for query chunk c against key chunks c-1 and c.

    Query r of chunk c is position cW + r. Key t of chunk c-1 ((c-1)W + t) is in its window iff
    t > r; key t of chunk c iff t <= r. Chunk 0 has no chunk -1. Returns (N, W, W) and (W, W).
    """
    r = torch.arange(window, device=like.device).unsqueeze(-1)
    t = torch.arange(window, device=like.device)
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    outside = torch.full((), -math.inf, dtype=like.dtype, device=like.device)
    previous = torch.where(t > r, zero, outside).expand(n_chunks, -1, -1).clone()
    previous[0] = -math.inf
    return previous, torch.where(t <= r, zero, outside)


def window_scores(q_c: torch.Tensor, k_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of query chunk c against key chunks c-1 and c, -inf outside the window.

    q_c, k_c: (B, H, N, W, D), q already multiplied by the temperature. Returns two
    (B, H, N, W, W): against chunk c-1 (window keys: strict upper triangle) and chunk c (lower
    triangle with the diagonal). The mask is added in place: no extra tensor, and its backward is
    the identity (masked scores get weight exp(-inf) = 0, hence zero gradient).
    """
    bias_previous, bias_current = window_bias(q_c.shape[2], q_c.shape[3], q_c)
    previous = (q_c @ shifted(k_c).transpose(-1, -2)).add_(bias_previous)
    current = (q_c @ k_c.transpose(-1, -2)).add_(bias_current)
    return previous, current


NEIGHBOURS = (1, 0, -1)  # key chunks c-1, c, c+1 of query chunk c, as `shifted(x, by=...)`


def centred_inside(window: int, like: torch.Tensor) -> list[torch.Tensor]:
    """(W, W) bool per neighbour chunk c-1, c, c+1 (chunk size = window): is key t of that chunk
    in the centred window of query r of chunk c? Offsets j - i = t - r - by * window."""
    before, after = centred(window)
    r = torch.arange(window, device=like.device).unsqueeze(-1)
    t = torch.arange(window, device=like.device)
    offsets = [t - r - by * window for by in NEIGHBOURS]
    return [(offset >= -before) & (offset <= after) for offset in offsets]


def key_bias(real: torch.Tensor, window: int, like: torch.Tensor) -> torch.Tensor:
    """(B, L) real-token mask -> additive key bias (B, 1, N, 1, W): 0 for real keys, -inf for
    padded keys and the chunk padding past L."""
    bias = torch.zeros(real.shape, dtype=like.dtype, device=like.device)
    bias = bias.masked_fill(~real, -math.inf)[:, None, :, None]
    return chunked(bias, window, fill=-math.inf).transpose(-1, -2)


def centred_scores(q_c: torch.Tensor, k_c: torch.Tensor, bias: torch.Tensor) -> list[torch.Tensor]:
    """Scores of query chunk c against key chunks c-1, c and c+1, -inf outside the centred window
    and on padded keys. q_c, k_c: (B, H, N, W, D), q multiplied by the temperature; bias from
    `key_bias`. Returns three (B, H, N, W, W), masked in place (their backward is the identity)."""
    blocks = []
    for by, inside in zip(NEIGHBOURS, centred_inside(q_c.shape[3], q_c)):
        outside = torch.zeros(inside.shape, dtype=q_c.dtype, device=q_c.device)
        outside.masked_fill_(~inside, -math.inf)
        scores = q_c @ shifted(k_c, by=by).transpose(-1, -2)
        blocks.append(scores.add_(outside).add_(shifted(bias, -math.inf, by)))
    return blocks


def centred_part(
    q: torch.Tensor, k: torch.Tensor, vx: torch.Tensor, window: int, real: torch.Tensor
) -> Part:
    """Exact `exp(q.k)` over the centred window's real keys, chunked with chunk size = window.

    q: (B, H, L, D), multiplied by the temperature; k: (B, H, L, D); vx: (B, H, L, E); real: (B, L)
    bool. Query chunk c meets key chunks c-1, c, c+1: scores 3 x (B, H, L/W, W, W), memory
    O(L window). A query with no real key in its window (only a padded one can) gets the EMPTY
    log-scale and zero sums. Returns the part (B, H, L, E) on the per-query max score.
    """
    length = q.shape[-2]
    q_c, k_c, vx_c = chunked(q, window), chunked(k, window), chunked(vx, window)
    blocks = centred_scores(q_c, k_c, key_bias(real, window, q))
    top = torch.stack([block.detach().amax(-1) for block in blocks]).amax(0).clamp_min(EMPTY)
    nd = sum(
        block.sub_(top.unsqueeze(-1)).exp_() @ shifted(vx_c, by=by)
        for by, block in zip(NEIGHBOURS, blocks)
    )
    return Part(unchunked(nd, length), unchunked(top, length))


def exact_part(q: torch.Tensor, k: torch.Tensor, vx: torch.Tensor) -> Part:
    """Every query of q (B, H, T, D, temperature applied) against every key of k (B, H, n, D):
    exact, unmasked (a decode step whose keys are exactly its window). vx: (B, H, n, E)."""
    scores = q @ k.transpose(-1, -2)
    top = scores.detach().amax(-1)
    return Part(scores.sub_(top.unsqueeze(-1)).exp_() @ vx, top)


def local_part(q: torch.Tensor, k: torch.Tensor, vx: torch.Tensor, window: int) -> Part:
    """Exact `exp(q.k)` over the window, chunked with chunk size = window.

    q: (B, H, L, D), already multiplied by the temperature; k: (B, H, L, D); vx: (B, H, L, E).
    Query chunk c meets keys of chunks c-1 and c only: scores 2 x (B, H, L/W, W, W), memory
    O(L window), never L x L. Returns the part (B, H, L, E) on the per-query max score.
    """
    length = q.shape[-2]
    q_c, k_c, vx_c = chunked(q, window), chunked(k, window), chunked(vx, window)
    previous, current = window_scores(q_c, k_c)
    top = torch.maximum(previous.detach().amax(-1), current.detach().amax(-1)).unsqueeze(-1)
    nd = previous.sub_(top).exp_() @ shifted(vx_c) + current.sub_(top).exp_() @ vx_c
    return Part(unchunked(nd, length), unchunked(top.squeeze(-1), length))


@dataclass(frozen=True)
class LocalOptions(Options):
    window: int = 128  # the most recent keys (itself included) each query sees

    def checked(self, head_dim: int) -> LocalOptions:
        if not positive_int(self.window):
            raise ValueError(f"local: window must be a positive integer, got {self.window!r}")
        return super().checked(head_dim)


class LocalAttention(nn.Module):
    """Sliding-window softmax: query i sees the `window` most recent keys j in (i - window, i]
    (causal), or the `window` keys around it, j - i in [-(window // 2), (window - 1) // 2], minus
    padded ones (non-causal).

    Time O(L window D), memory O(L window).
    """

    kind = "local"
    Options = LocalOptions

    def __init__(self, head_dim: int, **options):
        super().__init__()
        o = self.Options(**options).checked(head_dim)
        self.head_dim, self.window, self.causal = head_dim, o.window, o.causal
        self.tau = head_dim**-0.5

    @full_precision
    def forward_parts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> Part:
        """(B, H, L, D) each -> the unnormalised part (fp32, or fp64 for fp64 inputs)."""
        real = real_tokens(self.causal, key_padding_mask, q)
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if real is not None:
            return centred_part(q * self.tau, k, with_ones(v), self.window, real)
        return local_part(q * self.tau, k, with_ones(v), self.window)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype; key_padding_mask (B, L) bool, True
        for real tokens (non-causal only): padded queries output 0. `hash_qk` is ignored."""
        real = real_tokens(self.causal, key_padding_mask, q)
        return normalise(self.forward_parts(q, k, v, real), real).to(v.dtype)

    @full_precision
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

        The cache holds the last window - 1 keys and values, all a later query can still see.
        """
        causal_only(self)
        context_k, context_v = cached_kv(cache, k, v)
        seen = context_k.shape[-2]
        all_k = torch.cat([context_k, k], dim=-2)
        all_v = torch.cat([context_v, v], dim=-2)
        if q.shape[-2] == 1:  # one step: its window is the cached keys and its own
            dtype = compute_dtype(q)
            q, keys, values = (x.to(dtype) for x in (q, all_k, all_v))
            out = normalise(exact_part(q * self.tau, keys, with_ones(values)))
        else:  # context positions get dummy zero queries; their outputs are dropped
            padded_q = torch.cat([torch.zeros_like(context_k), q], dim=-2)
            out = normalise(self.forward_parts(padded_q, all_k, all_v))[:, :, seen:]
        start = max(0, all_k.shape[-2] - (self.window - 1))
        cache = {"k": all_k[:, :, start:], "v": all_v[:, :, start:]}
        return out.to(v.dtype), cache if keep_cache else None
