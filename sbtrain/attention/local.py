"""Exact softmax over a sliding window: query i sees keys j in (i - window, i]."""

from __future__ import annotations

import math

import torch
from torch import nn

from sbtrain.attention.common import (
    Part,
    cached_kv,
    chunked,
    compute_dtype,
    full_precision,
    normalise,
    shifted,
    unchunked,
    with_ones,
)


def _outside_window(n_chunks: int, window: int, device: torch.device) -> torch.Tensor:
    """(N, W, 2W) bool, True where key t of [chunk c-1, chunk c] is not in query r's window.

    Query r of chunk c is position cW + r; key t is position (c-1)W + t; it is in the window iff
    r < t <= r + W. Chunk 0 has no chunk -1.
    """
    r = torch.arange(window, device=device).unsqueeze(-1)
    t = torch.arange(2 * window, device=device)
    band = (t <= r) | (t > r + window)  # (W, 2W)
    first = band | (t < window)
    return torch.cat([first.unsqueeze(0), band.expand(n_chunks - 1, -1, -1)])


def local_part(q: torch.Tensor, k: torch.Tensor, vx: torch.Tensor, window: int) -> Part:
    """Exact `exp(q.k)` over the window, chunked with chunk size = window.

    q: (B, H, L, D), already multiplied by the temperature; k: (B, H, L, D); vx: (B, H, L, E).
    Query chunk c meets keys of chunks c-1 and c only: scores (B, H, L/W, W, 2W), memory
    O(L window), never L x L. Returns the part (B, H, L, E) on the per-query max score.
    """
    length = q.shape[-2]
    q_c, k_c, vx_c = chunked(q, window), chunked(k, window), chunked(vx, window)
    keys = torch.cat([shifted(k_c), k_c], dim=-2)  # (B, H, N, 2W, D)
    values = torch.cat([shifted(vx_c), vx_c], dim=-2)  # (B, H, N, 2W, E)
    scores = q_c @ keys.transpose(-1, -2)  # (B, H, N, W, 2W)
    scores = scores.masked_fill(_outside_window(q_c.shape[2], window, q.device), -math.inf)
    top = scores.detach().amax(-1)  # finite: the diagonal is always in the window
    nd = torch.exp(scores - top.unsqueeze(-1)) @ values
    return Part(unchunked(nd, length), unchunked(top, length))


class LocalAttention(nn.Module):
    """Sliding-window softmax: query i sees the `window` most recent keys j in (i - window, i].

    Time O(L window D), memory O(L window).
    """

    def __init__(self, head_dim: int, window: int = 128):
        super().__init__()
        self.head_dim = head_dim
        self.window = window
        self.tau = head_dim**-0.5

    @staticmethod
    def check_options(head_dim: int, window: int = 128) -> None:
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"local: window must be a positive integer, got {window!r}")

    def forward_parts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Part:
        """(B, H, L, D) each -> the unnormalised part (fp32, or fp64 for fp64 inputs)."""
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return local_part(q * self.tau, k, with_ones(v), self.window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype."""
        with full_precision(q):
            return normalise(self.forward_parts(q, k, v)).to(v.dtype)

    def decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """The next T tokens (B, H, T, D) after those in `cache` -> (out (B, H, T, D), cache).

        The cache holds the last window - 1 keys and values, all a later query can still see.
        """
        context_k, context_v = cached_kv(cache, k, v)
        seen = context_k.shape[-2]
        with full_precision(q):
            # context positions get dummy zero queries; their outputs are dropped
            padded_q = torch.cat([torch.zeros_like(context_k), q], dim=-2)
            all_k = torch.cat([context_k, k], dim=-2)
            all_v = torch.cat([context_v, v], dim=-2)
            out = normalise(self.forward_parts(padded_q, all_k, all_v))[:, :, seen:]
        start = max(0, all_k.shape[-2] - (self.window - 1))
        return out.to(v.dtype), {"k": all_k[:, :, start:], "v": all_v[:, :, start:]}
