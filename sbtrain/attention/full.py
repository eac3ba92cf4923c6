"""Exact causal softmax attention through PyTorch's fused SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.attention.common import cached_kv


class FullAttention(nn.Module):
    """`softmax(q k^T / sqrt(d)) v` over all keys j <= i. Time O(L^2 d), memory O(L) (flash)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    @staticmethod
    def check_options(head_dim: int) -> None:
        """Nothing to check: full attention has no options."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D). `hash_qk` is ignored (nothing is hashed)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: dict | None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The next T tokens (B, H, T, D) after those in `cache` -> (out (B, H, T, D), cache).

        The cache holds every key and value (a KV cache).
        """
        context_k, context_v = cached_kv(cache, k, v)
        all_k, all_v = torch.cat([context_k, k], dim=-2), torch.cat([context_v, v], dim=-2)
        seen, count = context_k.shape[-2], q.shape[-2]
        rows = torch.arange(seen, seen + count, device=q.device).unsqueeze(-1)
        visible = torch.arange(seen + count, device=q.device) <= rows  # (T, n + T)
        out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=visible)
        return out, {"k": all_k, "v": all_v}
