"""Pieces every non-SDPA kind shares: compute precision, chunking, and log-scaled partial sums.

A *part* of an attention output is, per query, an unnormalised numerator and denominator together
with a log-scale: the true sums are `nd * exp(log_scale)`. Parts computed on different scales
(exact scores, random-feature products) are added like logaddexp, so nothing overflows and the
denominator, a sum of positive terms, stays positive. The denominator rides along as an extra
last column of the values (`with_ones`), so one matmul produces numerator and denominator.

Log-scales are always *detached*: a part represents `nd * exp(log_scale)`, whose value does not
depend on the scale chosen, so treating the scale as a constant gives exact gradients and saves
the backward of every max.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The log-scale of an empty part: exp(EMPTY - finite) is 0, and EMPTY - EMPTY is 0, not NaN.
EMPTY = -1.0e30


class Part(NamedTuple):
    """Per query: `nd` (B, H, L, D+1), numerator then denominator; `log_scale` (B, H, L)."""

    nd: torch.Tensor
    log_scale: torch.Tensor


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests); everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def full_precision(method: Callable) -> Callable:
    """Run `method(self, q, ...)` with autocast off on q's device: states, sums and denominators
    must not drop to bf16/fp16 (the method casts its inputs to `compute_dtype` itself)."""

    @functools.wraps(method)
    def wrapper(self, q: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=q.device.type, enabled=False):
            return method(self, q, *args, **kwargs)

    return wrapper


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """(…, D) -> (…, D+1): a column of ones, so `weights @ with_ones(v)` also sums the weights."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def combine(*parts: Part) -> Part:
    """Add parts on their common log-scale (the largest): logaddexp for (numerator, denominator)."""
    scale = parts[0].log_scale
    for part in parts[1:]:
        scale = torch.maximum(scale, part.log_scale)
    nd = sum(p.nd * torch.exp(p.log_scale - scale).unsqueeze(-1) for p in parts)
    return Part(nd, scale)


def subtract(whole: Part, piece: Part) -> Part:
    """`whole - piece`, where `piece` is a sub-sum of `whole`'s positive terms.

    The denominator is clamped at 0: mathematically it is a sum of the remaining positive terms,
    and rounding must not make it negative.
    """
    scale = torch.maximum(whole.log_scale, piece.log_scale)
    nd = whole.nd * torch.exp(whole.log_scale - scale).unsqueeze(-1)
    nd = nd - piece.nd * torch.exp(piece.log_scale - scale).unsqueeze(-1)
    return Part(torch.cat([nd[..., :-1], nd[..., -1:].clamp_min(0.0)], dim=-1), scale)


def normalise(part: Part, real: torch.Tensor | None = None) -> torch.Tensor:
    """Numerator / denominator: (B, H, L, D+1) -> (B, H, L, D).

    With `real` (B, L) bool (non-causal attention), a padded query's output is 0, with zero
    gradient, whatever its (possibly empty) sums hold: its denominator is replaced by 1 first, so
    neither forward nor backward divides by 0.
    """
    if real is None:
        return part.nd[..., :-1] / part.nd[..., -1:]
    real = real[:, None, :, None]
    denominator = torch.where(real, part.nd[..., -1:], 1.0)
    return torch.where(real, part.nd[..., :-1] / denominator, 0.0)


def real_tokens(
    causal: bool, key_padding_mask: torch.Tensor | None, q: torch.Tensor
) -> torch.Tensor | None:
    """The (B, L) bool mask of real tokens for non-causal attention (all True without a mask);
    None for causal attention, which takes no mask (ValueError if one is given)."""
    if causal:
        if key_padding_mask is not None:
            raise ValueError(
                "key_padding_mask is for non-causal attention only: build the attention with "
                "causal=False, or pass no mask"
            )
        return None
    batch, length = q.shape[0], q.shape[-2]
    if key_padding_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=q.device)
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (batch, length) = ({batch}, "
            f"{length}), True for real tokens; got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )
    return key_padding_mask


def centred(window: int) -> tuple[int, int]:
    """A non-causal window of `window` keys around query i: (keys before i, keys after i) =
    (window // 2, (window - 1) // 2), so j - i in [-(window // 2), (window - 1) // 2]."""
    return window // 2, (window - 1) // 2


@dataclass(frozen=True)
class Options:
    """The options of an attention kind: each kind's module has a subclass as `Options`, whose
    `checked(head_dim)` returns them validated, defaults resolved, or raises ValueError."""

    causal: bool = True  # False: every real key on both sides (encoders), with a padding mask

    def checked(self, head_dim: int) -> Options:
        check_causal(self.causal)
        return self


def check_causal(causal: bool) -> None:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be true or false, got {causal!r}")


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def causal_only(module) -> None:
    """Decoding generates left to right: a non-causal module cannot decode."""
    if not module.causal:
        raise ValueError("decode is for causal attention only (this one was built causal=False)")


def chunked(x: torch.Tensor, chunk: int, fill: float = 0.0) -> torch.Tensor:
    """(B, H, L, X) -> (B, H, N, chunk, X), padding the end of L with `fill` to N * chunk."""
    length = x.shape[-2]
    pad = -length % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad), value=fill)
    return x.unflatten(-2, (x.shape[-2] // chunk, chunk))


def unchunked(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, N, C, *X) -> (B, H, length, *X): undo `chunked`, dropping the padding."""
    return x.flatten(2, 3)[:, :, :length]


def shifted(x: torch.Tensor, fill: float = 0.0, by: int = 1) -> torch.Tensor:
    """(B, H, N, C, X) -> the same, chunk c holding chunk c - by for `by` = 1 (chunk 0 holds
    `fill`), 0 (x itself) or -1 (chunk c + 1; the last chunk holds `fill`)."""
    if by == 0:
        return x
    edge = torch.full_like(x[:, :, :1], fill)
    if by == 1:
        return torch.cat([edge, x[:, :, :-1]], dim=2)
    return torch.cat([x[:, :, 1:], edge], dim=2)


def resolve_seed(seed: int | None) -> int:
    """`seed`, or one drawn from the global torch RNG (so a seeded model is deterministic)."""
    if seed is not None:
        return seed
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def generator(seed: int) -> torch.Generator:
    """A CPU generator: buffers are drawn on CPU, the same on every device, then moved."""
    return torch.Generator().manual_seed(seed)


def cached_kv(
    cache: dict | None, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode cache's keys and values (B, H, n, D), or empty ones shaped like `k`, `v`."""
    if cache is None or "k" not in cache:
        return k[:, :, :0], v[:, :, :0]
    return cache["k"], cache["v"]


def check_seed(seed: int | None) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or null, got {seed!r}")
