r"""`sbtrain bench gpt`: tokens/s of a plain GPT training loop, the yardstick for `bench train`.

A minimal GPT written without anything of sbtrain's (no trainer, no attention dispatch, no
chunked loss): pre-LN blocks with SDPA causal attention and a GELU MLP, learned positions, tied
softmax over the whole vocabulary, AdamW, bf16 autocast, clipping, eager. The defaults are the
shape of the wt103 model with full attention and a 32k vocabulary (16 layers, 8 heads, d_model
512, d_ff 2048, dropout 0.1: 68M parameters), batch 12 x 2048, so that

    sbtrain bench gpt --device cuda
    sbtrain bench train recipes/wt103-full.yaml model.output=softmax train.device=cuda \
        --vocab-size 32000

time the same model two ways; sbtrain should reach >= 0.95x this loop's tokens/s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain import bench
from sbtrain.distributed import pick_device


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, nh, T, hs)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, vocab: int, length: int, layers: int, d_model: int, heads: int, d_ff: int,
                 dropout: float):  # fmt: skip
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, d_model), nn.Embedding(length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff, dropout) for _ in range(layers))
        self.ln, self.drop = nn.LayerNorm(d_model), nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tokens(idx) + self.positions.weight[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.tokens.weight.T  # tied softmax, (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def bench_gpt(vocab=32000, length=2048, batch=12, layers=16, d_model=512, heads=8, d_ff=2048,
              dropout=0.1, steps=10, warmup=3, device="cuda") -> dict:  # fmt: skip
    """Time `steps` training steps after `warmup`; returns one row."""
    dev = pick_device(device)
    torch.manual_seed(0)
    model = GPT(vocab, length, layers, d_model, heads, d_ff, dropout).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = torch.randint(0, vocab, (batch, length + 1), device=dev)
    bf16 = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        with bf16:
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    row = {
        "model": "plain GPT",
        "length": length,
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "precision": "bf16",
        "step_ms": 1000 * seconds,
        "tokens_per_s": batch * length / seconds,
    }
    if dev.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return {"machine": bench.machine(dev), "device": str(dev), "row": row}


def main(
    vocab_size: int = 32000,
    length: int = 2048,
    batch: int = 12,
    layers: int = 16,
    d_model: int = 512,
    steps: int = 10,
    warmup: int = 3,
    device: str = "cuda",
    out: str | None = None,
) -> dict:
    """`sbtrain bench gpt`: one row, printed and written to `out`."""
    result = bench_gpt(vocab_size, length, batch, layers, d_model, max(1, d_model // 64),
                       4 * d_model, steps=steps, warmup=warmup, device=device)  # fmt: skip
    settings = {"steps": steps, "warmup": warmup, "eager": True}
    meta = {"machine": result["machine"], "settings": settings}
    return bench.report("gpt", [result["row"]], out, meta)
