"""Context parallelism: a sequence split into P contiguous chunks over the P processes of a group,
each computing its chunk's queries exactly as one process computes them for the whole sequence.

What a chunk needs from the chunks before it is what the kind's decoding cache holds (the
kernels' `decode` computes new queries after a cache, and equals the full forward pass):
- local: the previous chunk's last window - 1 keys and values (a halo);
- performer: the low-rank state of every earlier key, Σ exp(log phi(k) - M) [v, 1]^T with its
  per-feature log-scale M — a (features x head_dim+1) tensor per head, whatever the length;
- scatterbrain (sparse local): both, the state covering the keys older than the halo;
- full: every earlier key and value (all-gathered: traffic grows with the length);
- lsh: refused (its support can reach any earlier key; no bounded summary exists).
Each process summarises its chunk (the halo, its state), the summaries are all-gathered, and each
process folds those of the chunks before its own into its cache: an exclusive scan whose size does
not depend on the sequence length. States carry their log-scale and merge by rescaling to the
larger one, as the chunked single-process computation does. Gradients flow back through the
gather (its backward sums every process's gradient for each summary), so the backward pass
equals the single-process one too.

    shard = Shard(rank, size, group)           # sbtrain.distributed builds it
    out = attend(kernel, q, k, v, {}, shard)   # q, k, v: this chunk's (B, H, T, D)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sbtrain.attention.common import compute_dtype, with_ones
from sbtrain.attention.features import FeatureState, empty_state, fold, map_log_features
from sbtrain.attention.performer import state_to_cache

CONTEXT_PARALLEL_KINDS = ("full", "local", "performer", "scatterbrain")


@dataclass
class Shard:
    """This process's chunk of every sequence: chunk `rank` of `size`, exchanged over `group`.
    `sent` counts the bytes this process sends in the exchanges (see `gather`)."""

    rank: int
    size: int
    group: object = None
    sent: list[int] = field(default_factory=lambda: [0])

    def start(self, length: int) -> int:
        """The first position of this chunk when each chunk holds `length` positions."""
        return self.rank * length

    def gather(self, x: torch.Tensor, used: list) -> torch.Tensor:
        """(size, *x.shape): every process's `x`, differentiable (appended to `used`, see
        `attend`). Counted as sent, where the exchange runs: x to each of the others, and in
        the backward pass (when x needs gradients) a ring all-reduce of the gathered gradient,
        2 (size - 1) / size of its bytes (so a forward pass recomputed under activation
        checkpointing counts again, its backward once)."""
        self.sent[0] += x.numel() * x.element_size() * (self.size - 1)
        gathered = _Gather.apply(x, self)
        used.append(gathered)
        return gathered


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: Shard) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x, group=shard.group)
        ctx.shard = shard
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # every process's gradient for every summary, summed
        dist.all_reduce(grad, group=ctx.shard.group)
        size = ctx.shard.size
        ctx.shard.sent[0] += 2 * (size - 1) * grad.numel() * grad.element_size() // size
        return grad[ctx.shard.rank], None


def merge(states: list[FeatureState]) -> FeatureState:
    """The state of the keys of several states together: each rescaled to the larger log-scale."""
    top = states[0].max
    for s in states[1:]:
        top = torch.maximum(top, s.max)
    nd = sum(s.nd * torch.exp(s.max - top).unsqueeze(-1) for s in states)
    return FeatureState(nd, top)


def check(kernel: nn.Module) -> None:
    if kernel.kind not in CONTEXT_PARALLEL_KINDS or getattr(kernel, "lsh", False):
        raise ValueError(
            f"context parallelism serves {', '.join(CONTEXT_PARALLEL_KINDS)} (scatterbrain with "
            "sparse=local); an LSH support can reach any earlier key"
        )


def attend(
    kernel: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict, shard: Shard
) -> torch.Tensor:
    """This chunk's output (B, H, T, D) of causal `kernel` over the whole sequence, from its
    chunk of q, k, v (rotated already under rope) and what the other chunks send."""
    check(kernel)
    used: list[torch.Tensor] = []  # everything gathered
    if kernel.kind == "full":
        out = _full(q, k, v, shard, used)
    else:
        if kernel.kind == "local":
            cache = _halo(k, v, kernel.window, shard, used)
        else:
            cache = _state_and_halo(kernel, k, v, shard, used)
        out, _ = kernel.decode(q, k, v, cache if shard.rank else None, keep_cache=False, **extra)
    # Every process must take part in every gather's backward (an all-reduce), in the same
    # order; chunk 0 uses nothing it gathers, so each gathered tensor joins the output with
    # weight 0: the same graph everywhere, the same values. One element of each, in fp32, so no
    # fp16 sum can overflow to inf (0 * inf is NaN).
    anchor = sum(g.reshape(-1)[:1].float().sum() for g in used if g.requires_grad)
    return out + 0 * anchor if torch.is_tensor(anchor) else out


def _full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: Shard, used: list):
    """Exact attention of the chunk's queries over every key up to them (all keys gathered)."""
    length = q.shape[-2]
    keys = shard.gather(k, used)[: shard.rank + 1]  # (r + 1, B, H, T, D): the chunks so far
    values = shard.gather(v, used)[: shard.rank + 1]
    keys = torch.cat(list(keys), dim=-2)
    values = torch.cat(list(values), dim=-2)
    rows = torch.arange(length, device=q.device)[:, None] + shard.start(length)
    mask = torch.arange(keys.shape[-2], device=q.device)[None, :] <= rows  # (T, (r + 1) T)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _halo(k: torch.Tensor, v: torch.Tensor, window: int, shard: Shard, used: list) -> dict:
    """The previous chunk's last window - 1 keys and values (a decode cache of local)."""
    width = min(window - 1, k.shape[-2])
    tails = shard.gather(
        torch.stack([k[:, :, k.shape[-2] - width :], v[:, :, v.shape[-2] - width :]]), used
    )
    previous = tails[max(shard.rank - 1, 0)]
    return {"k": previous[0], "v": previous[1]}


def _state_and_halo(
    kernel: nn.Module, k: torch.Tensor, v: torch.Tensor, shard: Shard, used: list
) -> dict:
    """performer / scatterbrain: the state of every key before the halo (all of the earlier
    chunks but the previous one's last window - 1 keys), and the halo (with a window)."""
    window = getattr(kernel, "window", 0)
    held = min(max(window - 1, 0), k.shape[-2])  # this chunk's keys a later halo carries
    # recomputed in the backward pass rather than kept: the chunk's features and [v, 1] would add
    # 8% to what one process keeps per token for a wt103 block's backward
    nds, maxes = checkpoint(_summaries, kernel, k, v, k.shape[-2] - held, use_reentrant=False)
    nds = shard.gather(nds, used)  # (P, 2, B, H, m, E)
    maxes = shard.gather(maxes.detach(), used)
    r = shard.rank
    earlier = [FeatureState(nds[j, 1], maxes[j, 1]) for j in range(max(r - 1, 0))]
    if r > 0:
        earlier.append(FeatureState(nds[r - 1, 0], maxes[r - 1, 0]))
    cache = state_to_cache(merge(earlier)) if earlier else {}
    if window:
        cache.update(_halo(k, v, window, shard, used))
    return cache


def _summaries(
    kernel: nn.Module, k: torch.Tensor, v: torch.Tensor, cut: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The states of this chunk's keys before `cut` and of all of them: (2, B, H, m, E) sums
    and (2, B, H, m) log-scales."""
    dtype = compute_dtype(k)
    lk = map_log_features(kernel, k.to(dtype))
    vx = with_ones(v.to(dtype))
    before_halo = fold(empty_state(lk, vx), lk[:, :, :cut], vx[:, :, :cut])
    whole = fold(before_halo, lk[:, :, cut:], vx[:, :, cut:])
    return torch.stack([before_halo.nd, whole.nd]), torch.stack([before_halo.max, whole.max])


def traffic(
    kind: str,
    batch: int,
    heads: int,
    head_dim: int,
    length: int,
    parts: int,
    window: int = 0,
    n_features: int = 0,
    itemsize: int = 4,
    forwards: int = 1,
) -> int:
    """Bytes one process sends for one layer's forward and backward pass under `parts`-way
    context parallelism, as `Shard.gather` counts them: full gathers its chunk's keys and values
    (growing with `length`); local its halo; performer and scatterbrain their state (and halo).
    `forwards` 2: the forward pass run again in the backward (activation checkpointing)."""
    chunk = length // parts
    send = lambda n, grad=True: n * itemsize * (parts - 1) * (forwards + 2 * grad)  # noqa: E731
    if kind == "full":
        return 2 * send(batch * heads * chunk * head_dim)
    halo = send(2 * batch * heads * min(max(window - 1, 0), chunk) * head_dim) if window else 0
    if kind == "local":
        return halo
    states = batch * heads * n_features
    return send(2 * states * (head_dim + 1)) + send(2 * states, grad=False) + halo
