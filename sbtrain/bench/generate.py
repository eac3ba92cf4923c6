"""`sbtrain bench generate`: time and cache memory per generated token versus context length.

A model of the given size (random weights, sinusoidal positions) is prefilled with `context`
random tokens, then decodes `steps` tokens one at a time. Cache memory is the bytes held by
all layers' attention caches after the steps: it grows with the context for full attention
and stays flat for performer and scatterbrain (sparse: local).
"""

from __future__ import annotations

import time

import torch

from sbtrain import bench
from sbtrain.config import AttentionConfig, DecoderConfig
from sbtrain.distributed import pick_device
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM

KINDS = {  # decodable kinds at the paper's budget (LSH recomputes: not a decoding kind)
    label: AttentionConfig(kind=kind, **options)
    for label, (kind, options) in bench.PAPER_BUDGET.items()
    if kind != "lsh"
}


def cache_bytes(caches: list[dict]) -> int:
    return sum(
        t.numel() * t.element_size() for c in caches for t in c.values() if torch.is_tensor(t)
    )


@torch.no_grad()
def bench_generate(
    kinds: list[str],
    contexts: list[int],
    steps: int = 32,
    n_layers: int = 4,
    d_model: int = 256,
    n_heads: int = 4,
    vocab_size: int = 1000,
    device: str = "cpu",
) -> list[dict]:
    rows = []
    for kind in kinds:
        cfg = DecoderConfig(
            n_layers=n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_ff=4 * d_model,
            dropout=0.0,
            positions="sinusoidal",
            attention=KINDS[kind],
        )
        torch.manual_seed(0)
        model = TransformerLM(cfg, vocab_size, max_len=max(contexts) + steps).to(device).eval()
        for context in contexts:
            prompt = torch.randint(0, vocab_size, (1, context), device=device)
            hidden, caches = model.decode(prompt, None, start=0)
            token = hidden[:, -1:].sum(-1).long().abs() % vocab_size  # any token will do
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for step in range(steps):
                hidden, caches = model.decode(token, caches, start=context + step)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row = {
                "kind": kind,
                "context": context,
                "ms_per_token": 1000 * (time.perf_counter() - start) / steps,
                "cache_mib": cache_bytes(caches) / 2**20,
            }
            if device.startswith("cuda"):
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
    return rows


def main(
    kinds: list[str] = ("full", "local", "performer", "scatterbrain"),
    contexts: list[int] = (1024, 4096, 16384),
    steps: int = 32,
    device: str = "cpu",
    out: str | None = None,
) -> dict:
    """`sbtrain bench generate`: measure, print the table, write JSON to `out`."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UserError(f"--kinds: unknown {', '.join(sorted(unknown))} (have {', '.join(KINDS)})")
    where = pick_device(device)  # one line, not a traceback, for a device not here
    rows = bench_generate(list(kinds), list(contexts), steps, device=str(where))
    settings = {
        "steps": steps,
        "device": device,
        "kinds": {k: {f: v for f, v in vars(KINDS[k]).items() if v is not None} for k in kinds},
    }
    meta = {"machine": bench.machine(where), "settings": settings}
    return bench.report("generate", rows, out, meta)
