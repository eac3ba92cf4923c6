"""Performer: linear attention with positive random features (FAVOR+ by default, see
features.py for the maps), causal (chunked prefix sums) or over every real key (one sum)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sbtrain.attention import dispatch
from sbtrain.attention.common import (
    Options,
    Part,
    causal_only,
    check_seed,
    compute_dtype,
    full_precision,
    generator,
    normalise,
    real_tokens,
    resolve_seed,
    with_ones,
)
from sbtrain.attention.features import (
    FeatureState,
    bidirectional_feature_sum,
    causal_feature_sum,
    check_feature_map,
    default_statistic,
    draw_projection,
    fusable,
    input_statistic,
    map_log_features,
)

CHUNK_SIZE = 64  # the default chunk of causal prefix sums


def check_features(
    head_dim: int, n_features: int, chunk_size: int, features: str = "favor+"
) -> None:
    """The checks every kind with a random-feature part shares."""
    check_feature_map(features)
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


def init_feature_map(module: nn.Module, features: str) -> None:
    """The buffers and attributes of a random-feature map, shared by performer and scatterbrain:
    `projection` (drawn by `redraw`), `features`, `fusable` (True: the fused Triton kernels may
    run it) and, for favor++ only, `feature_stat` (S of `optimal_a`, default data-independent)."""
    module.features = features
    module.fusable = fusable(features)
    shape = (module.n_features // 2, module.head_dim)
    module.register_buffer("projection", torch.empty(shape), persistent=True)
    if features == "favor++":
        stat = torch.tensor(default_statistic(module.head_dim), dtype=torch.float64)
        module.register_buffer("feature_stat", stat, persistent=True)


@torch.no_grad()
def calibrate(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
    """favor++: set `feature_stat` from queries and keys (B, H, L, D) of calibration data (not
    the data it will attend to); other maps have no statistic (a no-op)."""
    if module.features == "favor++":
        module.feature_stat.copy_(input_statistic(q, k, module.tau))


@dataclass(frozen=True)
class PerformerOptions(Options):
    n_features: int = 128  # random features, both halves counted
    chunk_size: int | None = None  # chunk of the causal prefix sums (default CHUNK_SIZE)
    seed: int | None = None  # of the projection (default: drawn from the global torch RNG)
    features: str = "favor+"  # the feature map: favor+ | simplex | favor++

    def checked(self, head_dim: int) -> PerformerOptions:
        super().checked(head_dim)
        if not self.causal and self.chunk_size is not None:
            raise ValueError(
                "performer: chunk_size only applies to causal attention (non-causal sums over "
                "all keys at once); leave it unset"
            )
        chunk = CHUNK_SIZE if self.chunk_size is None else self.chunk_size
        check_features(head_dim, self.n_features, chunk, self.features)
        check_seed(self.seed)
        return dataclasses.replace(self, chunk_size=chunk)


class PerformerAttention(nn.Module):
    """`phi(q_i).phi(k_j)` for every j <= i (causal) or every real key j (non-causal), normalised:
    unbiased for `exp(tau q.k)`.

    Causal: time O(L (m D + chunk (m + D))), memory O(L (m + chunk)); decoding keeps an O(m D)
    state. Non-causal: time O(L m D), memory O(L m), no chunks. The projection `W` is a persistent
    buffer drawn from `seed`.
    """

    kind = "performer"
    Options = PerformerOptions

    def __init__(self, head_dim: int, **options):
        super().__init__()
        o = self.Options(**options).checked(head_dim)
        self.head_dim = head_dim
        self.n_features = o.n_features
        self.chunk_size = o.chunk_size
        self.causal = o.causal
        self.tau = head_dim**-0.5
        self.impl = "auto"  # fused kernels or PyTorch path: see dispatch.py (not a checkpoint's)
        init_feature_map(self, o.features)
        self.redraw(resolve_seed(o.seed))

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw a new projection W from `seed` (by the trainer every train.redraw_interval
        updates, if set)."""
        drawn = draw_projection(self.head_dim, self.n_features, generator(seed), self.features)
        self.projection.copy_(drawn)

    @full_precision
    def _parts(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: FeatureState | None
    ) -> tuple[Part, FeatureState]:
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        lq, lk = map_log_features(self, q), map_log_features(self, k)
        return causal_feature_sum(lq, lk, with_ones(v), self.chunk_size, state)

    @full_precision
    def _bidirectional(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor
    ) -> Part:
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        lq, lk = map_log_features(self, q), map_log_features(self, k)
        return bidirectional_feature_sum(lq, lk, with_ones(v), real)

    def forward_parts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> Part:
        """(B, H, L, D) each -> the unnormalised part (fp32, or fp64 for fp64 inputs)."""
        real = real_tokens(self.causal, key_padding_mask, q)
        if real is not None:
            return self._bidirectional(q, k, v, real)
        return self._parts(q, k, v, None)[0]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        hash_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, H, L, D) -> (B, H, L, D) in v's dtype: causal, the fused Triton kernels
        (a `fusable` feature map only) or the PyTorch path, as `self.impl` (auto | pytorch | fused)
        and dispatch.py decide; key_padding_mask (B, L) bool, True for real tokens (non-causal
        only, PyTorch path): padded keys get no weight, padded queries output 0. `hash_qk` is
        ignored."""
        real = real_tokens(self.causal, key_padding_mask, q)
        if real is not None:
            return normalise(self.forward_parts(q, k, v, real), real).to(v.dtype)
        window = 0 if self.fusable else None  # None: no kernel for this feature map
        return dispatch.attention(self.impl, q, k, v, self.projection, window, self.pytorch_forward)

    def pytorch_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The causal PyTorch path of `forward` (the fused kernels' reference)."""
        return normalise(self.forward_parts(q, k, v)).to(v.dtype)

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

        The cache is the running state (Σ phi(k) [v, 1]^T and its per-feature log-scale): its size
        does not grow with the context. A prompt is processed chunked, like `forward`.
        """
        causal_only(self)
        part, state = self._parts(q, k, v, state_from_cache(cache))
        return normalise(part).to(v.dtype), state_to_cache(state) if keep_cache else None
