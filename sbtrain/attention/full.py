"""Exact softmax attention (causal, or over every real key) through PyTorch's fused SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.attention.common import Options, cached_kv, causal_only, real_tokens


class FullAttention(nn.Module):
    """`softmax(q k^T / sqrt(d)) v` over all keys j <= i (causal) or all real keys (non-causal).
    Time O(L^2 d), memory O(L) (flash). Options: `causal` only."""

    kind = "full"
    Options = Options

    def __init__(self, head_dim: int, **options):
        super().__init__()
        self.head_dim = head_dim
        self.causal = self.Options(**options).checked(head_dim).causal

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D); key_padding_mask (B, L) bool, True for real
        tokens (non-causal only): padded keys get no weight, padded queries output 0.
        `hash_qk` is ignored (nothing is hashed)."""
        real = real_tokens(self.causal, key_padding_mask, q)
        if real is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v)
        # a sequence without real tokens sees all its keys, so no row is empty (no NaN); its
        # outputs are zeroed below like every padded query's
        visible = real | ~real.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
        return out.masked_fill(~real[:, None, :, None], 0.0)

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

        The cache holds every key and value (a KV cache).
        """
        causal_only(self)
        context_k, context_v = cached_kv(cache, k, v)
        all_k, all_v = torch.cat([context_k, k], dim=-2), torch.cat([context_v, v], dim=-2)
        seen, count = context_k.shape[-2], q.shape[-2]
        rows = torch.arange(seen, seen + count, device=q.device).unsqueeze(-1)
        visible = torch.arange(seen + count, device=q.device) <= rows  # (T, n + T)
        out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=visible)
        return out, {"k": all_k, "v": all_v} if keep_cache else None
