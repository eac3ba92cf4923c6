"""Sequence classifiers: the language model's pre-LN blocks, not causal, over padded batches.

    model = Classifier(recipe.model, vocab_size=17, num_classes=10, max_len=2000,
                       pad_id=15, cls_id=16)
    logits = model(tokens, lengths)              # (B, T) int64 right-padded, (B,) -> (B, classes)
    nll = model.token_nll(logits, labels)        # (N,) nats of the labels that are not IGNORE

    pair = DualEncoderClassifier(...)            # retrieval: one encoder for both documents
    logits = pair(tokens_a, lengths_a, tokens_b, lengths_b)

Every classifier has the language model's interface to the trainer and the evaluator:
`forward(*inputs)`, `token_nll(outputs, targets)`, `predict(outputs)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sbtrain.batch import IGNORE
from sbtrain.config import EncoderConfig
from sbtrain.errors import UserError
from sbtrain.model import Block, init_weights, sinusoids


class Encoder(nn.Module):
    """Token embedding + positions, non-causal blocks, final LayerNorm, pooling over the real
    tokens: (B, T) tokens and (B,) lengths -> (B, d_model).

    `cls` pooling puts `cls_id` in front of every document (position 0) and returns its final
    state; `mean` averages the final states of the real tokens. Padding (id `pad_id`, after
    each document's `length` tokens) is masked out of every attention and of the pooling.
    """

    def __init__(self, cfg: EncoderConfig, vocab_size: int, max_len: int, pad_id: int, cls_id: int):
        super().__init__()
        self.cfg, self.pad_id, self.cls_id = cfg, pad_id, cls_id
        self.max_len = max_len + (cfg.pooling == "cls")  # positions, the CLS token's included
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(self.max_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer(
                "pos_table",
                sinusoids(self.max_len, cfg.d_model, cfg.sinusoid_scale),
                persistent=False,
            )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.attention, causal=False) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.activation_checkpointing = False  # set from train.activation_checkpointing

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            cls = torch.full_like(tokens[:, :1], self.cls_id)
            tokens, lengths = torch.cat([cls, tokens], dim=1), lengths + 1
        t = tokens.shape[1]
        if t > self.max_len:
            raise UserError(
                f"a document of {t} positions exceeds the encoder's {self.max_len}: "
                "evaluate data prepared with the recipe's data.tokens_per_sample"
            )
        real = torch.arange(t, device=tokens.device) < lengths[:, None]  # (B, T)
        x = self.tok_emb(tokens)
        if self.cfg.positions == "learned":
            x = x + self.pos_emb.weight[:t]
        elif self.cfg.positions == "sinusoidal":
            x = x + self.pos_table[:t].to(x.device)
        x = self.drop(x)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, real, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, real)
        x = self.ln_f(x)  # (B, T, C)
        if self.cfg.pooling == "cls":
            return x[:, 0]
        weights = real.to(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Classifier(nn.Module):
    """An encoder and an MLP head (d_model -> d_model -> classes): (B, T), (B,) -> logits."""

    features = 1  # pooled vectors the head reads

    def __init__(
        self,
        cfg: EncoderConfig,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        pad_id: int,
        cls_id: int,
    ):
        super().__init__()
        self.cfg, self.vocab_size, self.num_classes = cfg, vocab_size, num_classes
        self.encoder = Encoder(cfg, vocab_size, max_len, pad_id, cls_id)
        self.head = nn.Sequential(
            nn.Linear(self.features * cfg.d_model, cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.d_model, num_classes),
        )
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @property
    def max_len(self) -> int:
        """Longest document the encoder takes (the CLS token not counted)."""
        return self.encoder.max_len - (self.cfg.pooling == "cls")

    @property
    def activation_checkpointing(self) -> bool:
        return self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.encoder.activation_checkpointing = on

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens, lengths))

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in nats of each scored example: (B, classes), (B,) -> (N,)."""
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, classes) -> (N,) the most likely class."""
        return logits.argmax(-1)


class DualEncoderClassifier(Classifier):
    """Retrieval: one shared encoder reads both documents (u, v); the head reads
    [u, v, u*v, u-v] (4 d_model)."""

    features = 4

    def forward(
        self,
        tokens_a: torch.Tensor,
        lengths_a: torch.Tensor,
        tokens_b: torch.Tensor,
        lengths_b: torch.Tensor,
    ) -> torch.Tensor:
        u, v = self.encoder(tokens_a, lengths_a), self.encoder(tokens_b, lengths_b)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))
