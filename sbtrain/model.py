"""TransformerLM: a pre-LN decoder whose attention kernel comes from the recipe.

model = TransformerLM(recipe.model, vocab_size=267_744, max_len=2048)
nll_sum, n_tokens = model.loss(inputs, targets)        # (B, T) int64 each; -100 = not scored

Long sequences train in bounded memory: with `activation_checkpointing` each block is recomputed
in the backward pass (only its input is kept), and the output layer scores positions in chunks of
at most `output_chunk_elements` scores, each recomputed in the backward pass, so no
(tokens x vocabulary) tensor ever exists whole.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sbtrain.attention import build_attention, context_parallel, dispatch
from sbtrain.attention.context_parallel import Shard
from sbtrain.batch import IGNORE
from sbtrain.config import AttentionConfig, DecoderConfig, ModelConfig, Recipe
from sbtrain.errors import UserError

OUTPUT_CHUNK_ELEMENTS = 2**25  # scores (128 MiB in fp32) one chunk of the output layer may form


class Dropout(nn.Dropout):
    """nn.Dropout; on a chunk of a context-parallel sequence (`shard`), the chunk of the mask the
    whole sequence would draw, so every process applies the masks one process would."""

    def forward(self, x: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        if shard is None or not self.training or self.p == 0:
            return super().forward(x)
        b, t, c = x.shape  # the whole sequence's mask, from the same generator state everywhere
        whole = F.dropout(x.new_ones(b, t * shard.size, c), self.p, True)
        start = shard.start(t)
        return x * whole[:, start : start + t].clone()  # a copy: backward keeps the chunk only


class SelfAttention(nn.Module):
    """Projections around an attention kernel: (B, T, C) -> (B, T, C).

    With rotary positions the kernel gets rotated queries and keys, and the unrotated ones as
    `hash_qk`: what LSH buckets are drawn from (content, not position; other kinds ignore it).
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, causal: bool = True):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.rotary = cfg.positions == "rope"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        options = attention.options() if causal else {**attention.options(), "causal": False}
        self.kernel = build_attention(
            attention.kind, head_dim=cfg.d_model // cfg.n_heads, **options
        )

    def _heads(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, nh, T, hs) of positions start.., and the kernel's keyword arguments."""
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        if not self.rotary:
            return q, k, v, {}
        return rope(q, start), rope(k, start), v, {"hash_qk": (q, k)}

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); `key_padding_mask` (B, T) bool, True = a real token (non-causal only);
        `shard`: x is chunk shard.rank of each sequence (context parallelism)."""
        q, k, v, extra = self._heads(x, shard.start(x.shape[1]) if shard else 0)
        if key_padding_mask is not None:
            extra["key_padding_mask"] = key_padding_mask
        if shard is not None:
            return self._merge(context_parallel.attend(self.kernel, q, k, v, extra, shard))
        return self._merge(self.kernel(q, k, v, **extra))

    def decode(self, x: torch.Tensor, cache: dict | None, start: int) -> tuple[torch.Tensor, dict]:
        """The next T positions start.. given the kernel's cache of the earlier ones."""
        q, k, v, extra = self._heads(x, start)
        y, cache = self.kernel.decode(q, k, v, cache, **extra)
        return self._merge(y), cache


class Block(nn.Module):
    """Pre-LN transformer block; `causal=False` for encoders (classifiers), which take a key
    padding mask."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, causal: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, attention, causal)
        self.ln2 = self.mlp = None  # d_ff 0: an attention-only block
        if cfg.d_ff:
            self.ln2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
            )
        self.drop = Dropout(cfg.dropout)  # after the attention and after the feed-forward

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        return self.feed_forward(self.attend(x, key_padding_mask, shard), shard)

    def attend(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """The attention sublayer with its residual: (B, T, d_model) -> the same."""
        return x + self.drop(self.attn(self.ln1(x), key_padding_mask, shard), shard)

    def feed_forward(self, x: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        """The feed-forward sublayer with its residual: (B, T, d_model) -> the same."""
        if self.mlp is None:
            return x
        return x + self.drop(self.mlp(self.ln2(x)), shard)

    def decode(self, x: torch.Tensor, cache: dict | None, start: int) -> tuple[torch.Tensor, dict]:
        y, cache = self.attn.decode(self.ln1(x), cache, start)
        return self.feed_forward(x + self.drop(y)), cache


def sinusoids(length: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """(length, dim) fixed position encodings of "Attention is all you need", times `scale`."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table * scale


ROPE_BASE = 10000.0  # rotary angles: position * ROPE_BASE ** (-2i / head_dim)


def rope(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotary positions (RoFormer): rows (..., T, D) of positions start..start+T-1 -> the same,
    each pair (x_i, x_{i + D/2}) turned by the angle p * ROPE_BASE ** (-2i / D).

    Rotations keep norms and make q_m . k_n depend on m - n only. Angles are computed in fp64
    and the rotation in fp32 (fp64 stays fp64); returned in x's dtype.
    """
    t, d = x.shape[-2:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freq = ROPE_BASE ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angle = torch.arange(start, start + t, dtype=torch.float64, device=x.device)[:, None] * freq
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)  # (T, D/2)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights of linear and embedding layers, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TransformerLM(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, max_len: int):
        super().__init__()
        self.cfg, self.vocab_size, self.max_len = cfg, vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(max_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            table = sinusoids(max_len, cfg.d_model, cfg.sinusoid_scale)
            self.register_buffer("pos_table", table, persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.attention) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.adaptive = None
        if cfg.output == "adaptive":
            cutoffs = [c for c in cfg.adaptive_cutoffs if c < vocab_size]
            if not cutoffs:
                raise UserError(
                    f"model.adaptive_cutoffs {list(cfg.adaptive_cutoffs)}: none is below the "
                    f"vocabulary size {vocab_size}; lower them or use model.output=softmax"
                )
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                cfg.d_model, vocab_size, cutoffs, div_value=cfg.adaptive_div_value
            )
        self.activation_checkpointing = False  # set from train.activation_checkpointing
        self.shard: Shard | None = None  # set for context parallelism: the chunk it computes
        self.output_chunk_elements = OUTPUT_CHUNK_ELEMENTS
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _embed(
        self, tokens: torch.Tensor, start: int = 0, shard: Shard | None = None
    ) -> torch.Tensor:
        stop = start + tokens.shape[1]
        x = self.tok_emb(tokens)  # (B, T, C)
        if self.cfg.positions == "learned":
            if stop > self.max_len:
                raise UserError(
                    f"{stop} positions exceed the model's {self.max_len} learned positions"
                )
            x = x + self.pos_emb.weight[start:stop]
        elif self.cfg.positions == "sinusoidal":  # sinusoids extend past the training length
            table = self.pos_table
            if stop > len(table):
                table = sinusoids(stop, x.shape[-1], self.cfg.sinusoid_scale)
            x = x + table[start:stop].to(x.device)
        return self.drop(x, shard)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> final hidden states (B, T, C). With `self.shard` set, tokens
        are chunk shard.rank of each sequence (positions shard.start(T)..), computed as one
        process computes them for the whole sequence (context parallelism)."""
        shard = self.shard
        x = self._embed(tokens, shard.start(tokens.shape[1]) if shard else 0, shard)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keep only the block's input; the same dropout masks in recompute
                x = checkpoint(block, x, None, shard, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, None, shard)
        return self.ln_f(x)

    def decode(
        self, tokens: torch.Tensor, caches: list[dict] | None, start: int
    ) -> tuple[torch.Tensor, list[dict]]:
        """Hidden states of `tokens` (B, T) at positions start.., given the per-layer caches."""
        x = self._embed(tokens, start)
        caches = caches or [None] * len(self.blocks)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.decode(x, cache, start)
            new.append(cache)
        return self.ln_f(x), new

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., vocab) log-probabilities in fp32 (all at once)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.adaptive is not None:
            out = self.adaptive.log_prob(flat.to(self.adaptive.head.weight.dtype)).float()
        else:
            weight = self.tok_emb.weight
            out = F.log_softmax((flat.to(weight.dtype) @ weight.t()).float(), dim=-1)
        return out.view(*hidden.shape[:-1], -1)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) hidden states -> (N,) most likely next tokens, chunk by chunk."""
        return over_chunks(lambda h: self.log_probs(h).argmax(-1), self._chunk_rows(), hidden)

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats of each scored target: (B, T, C), (B, T) -> (N,).

        Computed over chunks of positions, each recomputed in the backward pass: the scores of
        one chunk (at most `output_chunk_elements`) are the largest tensor it forms.
        """
        keep = targets.reshape(-1) != IGNORE
        flat = hidden.reshape(-1, hidden.shape[-1])[keep]
        return over_chunks(self._nll, self._chunk_rows(), flat, targets.reshape(-1)[keep])

    def _nll(self, flat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unchunked loss: (N, C), (N,) -> (N,) nats. The output layer's weights set the
        product's dtype: fp32, or FSDP's compute dtype (bf16/fp16 under its precision policy)."""
        if self.adaptive is not None:
            head = self.adaptive.head.weight
            return -self.adaptive(flat.to(head.dtype), target).output.float()
        weight = self.tok_emb.weight
        logits = flat.to(weight.dtype) @ weight.t()  # tied output embedding
        return F.cross_entropy(logits.float(), target, reduction="none")

    def _chunk_rows(self) -> int:
        """Positions per chunk: the widest row of scores the output layer forms fits the budget
        (adaptive: the head or the largest tail cluster; softmax: the vocabulary)."""
        width = self.vocab_size
        if self.adaptive is not None:
            edges = self.adaptive.cutoffs  # [c1, ..., vocab_size]
            tails = [b - a for a, b in itertools.pairwise(edges)]
            width = max(self.adaptive.head_size, *tails)
        return max(1, self.output_chunk_elements // width)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed NLL in nats, number of scored targets) of a batch."""
        nll = self.token_nll(self(tokens), targets)
        return nll.sum(), nll.numel()


def over_chunks(function, rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """`function(*tensors)` (row-wise) over chunks of `rows` rows, concatenated.

    When gradients are on, each chunk is checkpointed: its intermediates are dropped after the
    forward pass and recomputed one chunk at a time in the backward pass.
    """
    if len(tensors[0]) <= rows:
        return function(*tensors)
    chunks = zip(*(t.split(rows) for t in tensors))  # split: one backward node, not one per chunk
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(function, *c, use_reentrant=False) for c in chunks])
    return torch.cat([function(*c) for c in chunks])


def prepare_model(recipe: Recipe, make) -> nn.Module:
    """`make()` (any task's model) initialised from train.seed, identically on every process,
    with the recipe's attention_impl and activation checkpointing."""
    torch.manual_seed(recipe.train.seed)
    model = make()
    dispatch.set_impl(model, recipe.train.attention_impl)
    model.activation_checkpointing = recipe.train.activation_checkpointing
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as random projections not included)."""
    return sum(p.numel() for p in model.parameters())
