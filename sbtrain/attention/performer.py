"""Performer (FAVOR+): causal linear attention with positive orthogonal random features."""

from __future__ import annotations

import torch
from torch import nn

from sbtrain.attention import dispatch
from sbtrain.attention.common import (
    Part,
    check_seed,
    compute_dtype,
    full_precision,
    generator,
    normalise,
    resolve_seed,
    with_ones,
)
from sbtrain.attention.features import (
    FeatureState,
    causal_feature_sum,
    draw_projection,
    log_features,
)


def check_features(head_dim: int, n_features: int, chunk_size: int) -> None:
    """The checks every kind with a random-feature part shares."""
    if not isinstance(n_features, int) or n_features <= 0 or n_features % 2:
        raise ValueError(
            f"n_features must be a positive even integer (both halves of the positive features "
            f"are counted), got {n_features!r}"
        )
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def state_from_cache(cache: dict | None) -> FeatureState | None:
    return None if cache is None else FeatureState(cache["state_nd"], cache["state_max"])


def state_to_cache(state: FeatureState) -> dict:
    return {"state_nd": state.nd, "state_max": state.max}


class PerformerAttention(nn.Module):
    """`phi(q_i).phi(k_j)` for every j <= i, normalised: unbiased for `exp(tau q.k)`.

    Time O(L (m D + chunk (m + D))), memory O(L (m + chunk)); decoding keeps an O(m D) state.
    The projection `W` is a persistent buffer drawn from `seed`.
    """

    def __init__(
        self, head_dim: int, n_features: int = 128, chunk_size: int = 64, seed: int | None = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.n_features = n_features
        self.chunk_size = chunk_size
        self.tau = head_dim**-0.5
        self.impl = "auto"  # fused kernels or PyTorch path: see dispatch.py (not a checkpoint's)
        self.register_buffer("projection", torch.empty(n_features // 2, head_dim), persistent=True)
        self.redraw(resolve_seed(seed))

    @staticmethod
    def check_options(
        head_dim: int, n_features: int = 128, chunk_size: int = 64, seed: int | None = None
    ) -> None:
        check_features(head_dim, n_features, chunk_size)
        check_seed(seed)

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw a new projection W from `seed` (never called automatically)."""
        drawn = draw_projection(self.head_dim, self.n_features, generator(seed))
        self.projection.copy_(drawn)

    @full_precision
    def _parts(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: FeatureState | None
    ) -> tuple[Part, FeatureState]:
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        lq = log_features(q, self.projection, self.tau)
        lk = log_features(k, self.projection, self.tau)
        return causal_feature_sum(lq, lk, with_ones(v), self.chunk_size, state)

    def forward_parts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Part:
        """(B, H, L, D) each -> the unnormalised part (fp32, or fp64 for fp64 inputs)."""
        return self._parts(q, k, v, None)[0]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype: the fused Triton kernels or the
        PyTorch path, as `self.impl` (auto | pytorch | fused) and dispatch.py decide."""
        return dispatch.attention(self.impl, q, k, v, self.projection, 0, self.pytorch_forward)

    def pytorch_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The PyTorch path of `forward` (the fused kernels' reference)."""
        return normalise(self.forward_parts(q, k, v)).to(v.dtype)

    def decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """The next T tokens (B, H, T, D) after those in `cache` -> (out (B, H, T, D), cache).

        The cache is the running state (Σ phi(k) [v, 1]^T and its per-feature log-scale): its size
        does not grow with the context. A prompt is processed chunked, like `forward`.
        """
        part, state = self._parts(q, k, v, state_from_cache(cache))
        return normalise(part).to(v.dtype), state_to_cache(state)
