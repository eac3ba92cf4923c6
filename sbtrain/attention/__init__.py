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

from dataclasses import fields

from torch import nn

from sbtrain.attention import dispatch
from sbtrain.attention.common import Options
from sbtrain.attention.features import fusable
from sbtrain.attention.full import FullAttention
from sbtrain.attention.local import LocalAttention
from sbtrain.attention.lsh import LSHAttention
from sbtrain.attention.performer import PerformerAttention
from sbtrain.attention.scatterbrain import ScatterbrainAttention

KINDS: dict[str, type[nn.Module]] = {
    module.kind: module
    for module in (
        FullAttention, LocalAttention, PerformerAttention, LSHAttention, ScatterbrainAttention
    )
}  # fmt: skip
# kinds with random projections or rotations (buffers drawn from a seed, redrawn on schedule)
RANDOM_KINDS = tuple(
    kind for kind, module in KINDS.items() if "seed" in {f.name for f in fields(module.Options)}
)


def build_attention(kind: str, head_dim: int, **options) -> nn.Module:
    """The attention module of `kind`; an option the kind does not take raises TypeError."""
    check_attention(kind, head_dim, **options)
    return KINDS[kind](head_dim=head_dim, **options)


def check_attention(kind: str, head_dim: int, **options) -> Options:
    """The options of `kind` validated, defaults filled in; ValueError/TypeError, with a message
    for a user, if `kind` cannot take them."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r} (choose from {', '.join(KINDS)})")
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    takes = [f.name for f in fields(KINDS[kind].Options)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise TypeError(
            f"attention kind {kind!r} does not take {', '.join(unknown)} "
            f"(it takes: {', '.join(takes)})"
        )
    return KINDS[kind].Options(**options).checked(head_dim)


def fused_obstacle(kind: str, head_dim: int, **options) -> str | None:
    """Why `attention_impl: fused` can never run this attention, whatever the device, or None:
    the fused kernels compute causal performer and scatterbrain with `sparse: local`, with the
    favor+ or simplex map, windows a multiple of 16, head sizes up to dispatch.MAX_HEAD_DIM,
    with Triton and torch at their floors."""
    o = check_attention(kind, head_dim, **options)
    if kind not in ("performer", "scatterbrain") or getattr(o, "sparse", "local") != "local":
        what = f"scatterbrain with sparse={o.sparse}" if kind == "scatterbrain" else kind
        return f"{what} has no fused kernel (scatterbrain with sparse=local and performer have)"
    if not o.causal:
        return "the fused kernels are causal only (a classifier's attention is not)"
    if not fusable(o.features):
        return f"the {o.features} feature map has no fused kernel (favor+ and simplex have)"
    if kind == "scatterbrain" and o.window % 16:
        return f"window {o.window} is not a multiple of 16"
    if head_dim > dispatch.MAX_HEAD_DIM:
        return f"head size {head_dim} is over {dispatch.MAX_HEAD_DIM}"
    return dispatch.version_problem()
