"""Attention kernels: one call for every kind.

    attn = build_attention("scatterbrain", head_dim=64, sparse="local", window=128, n_features=128)
    out = attn(q, k, v)   # (batch, heads, length, head_dim) -> same shape as v; causal
    out = attn(q, k, v, hash_qk=(q0, k0))   # LSH buckets drawn from q0, k0 (rotary: unrotated)
    bi = build_attention("scatterbrain", head_dim=64, causal=False, window=128, n_features=128)
    out = bi(q, k, v, key_padding_mask=mask)   # mask (batch, length) bool, True = a real token

Non-causal kinds see every real key (local: a centred window; lsh: same-bucket keys on both
sides); padded keys get no weight anywhere and padded queries output 0. Causal kinds refuse a
mask, non-causal ones refuse to decode.

Each kind lives in its own file; `reference.py` holds their dense float64 definitions, and
README.md in this folder states every kind's semantics, options and cost.
"""

from __future__ import annotations

import inspect

from torch import nn

from sbtrain.attention.full import FullAttention
from sbtrain.attention.local import LocalAttention
from sbtrain.attention.lsh import LSHAttention
from sbtrain.attention.performer import PerformerAttention
from sbtrain.attention.scatterbrain import ScatterbrainAttention

KINDS: dict[str, type[nn.Module]] = {
    "full": FullAttention,
    "local": LocalAttention,
    "performer": PerformerAttention,
    "lsh": LSHAttention,
    "scatterbrain": ScatterbrainAttention,
}


def build_attention(kind: str, head_dim: int, **options) -> nn.Module:
    """The attention module of `kind`; an option the kind does not take raises TypeError."""
    check_attention(kind, head_dim, **options)
    return KINDS[kind](head_dim=head_dim, **options)


def check_attention(kind: str, head_dim: int, **options) -> None:
    """Raise ValueError/TypeError, with a message for a user, if `kind` cannot take `options`."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r} (choose from {', '.join(KINDS)})")
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    params = inspect.signature(KINDS[kind]).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        takes = ", ".join(p for p in params if p != "head_dim") or "no options"
        raise TypeError(
            f"attention kind {kind!r} does not take {', '.join(unknown)} (it takes: {takes})"
        )
    KINDS[kind].check_options(head_dim=head_dim, **options)
