"""Exact causal softmax attention through PyTorch's fused SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FullAttention(nn.Module):
    """`softmax(q k^T / sqrt(d)) v` over all keys j <= i. Time O(L^2 d), memory O(L) (flash)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    @staticmethod
    def check_options(head_dim: int) -> None:
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
