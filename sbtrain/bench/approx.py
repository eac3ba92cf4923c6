"""How far each attention kind is from exact softmax attention, at an equal per-query budget.

    rows = run_approx_bench(budget=64)
    print(format_rows(rows))

Budgets count what a query pays for: `window` keys (local), `n_hashes * bucket_size` keys (lsh),
`n_features` (performer), `window + n_features` (scatterbrain). Errors are relative Frobenius
norms `|out - exact| / |exact|` in float64, averaged over seeds (each seed draws new inputs and
new random projections), for two input regimes:

- `random`: q, k, v i.i.d. Gaussian; no position matters more than another.
- `drift`: q and k follow one slow random walk along the sequence (plus noise), so nearby keys
  score high: the regime local attention is made for.

and a range of temperatures: q and k are scaled so the RMS of `tau * q.k` over causal pairs is
the given value (1: nearly uniform attention; 20: nearly one-hot).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch

from sbtrain.attention import KINDS, build_attention
from sbtrain.attention.full import FullAttention
from sbtrain.attention.reference import reference_attention
from sbtrain.errors import UserError

REGIMES = ("random", "drift")
TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0)


@dataclasses.dataclass(frozen=True)
class ApproxRow:
    """Mean relative output error of `kind` (a label) for one regime and temperature."""

    kind: str
    regime: str
    temperature: float
    budget: int
    error: float


def equal_budget_kinds(budget: int, n_buckets: int = 8) -> dict[str, tuple[str, dict, int]]:
    """label -> (kind, options, budget) with `budget` keys/features per query (budget % 4 == 0)."""
    half = budget // 2
    return {
        "local": ("local", {"window": budget}, budget),
        "performer": ("performer", {"n_features": budget}, budget),
        "lsh": ("lsh", {"n_hashes": 2, "bucket_size": half, "n_buckets": n_buckets}, budget),
        "scatterbrain": (
            "scatterbrain",
            {"sparse": "local", "window": half, "n_features": half},
            budget,
        ),
    }


def run_approx_bench(
    budget: int = 64,
    length: int = 1024,
    heads: int = 4,
    head_dim: int = 64,
    temperatures: tuple[float, ...] = TEMPERATURES,
    regimes: tuple[str, ...] = REGIMES,
    seeds: int = 3,
) -> list[ApproxRow]:
    """Rows for every kind of `equal_budget_kinds(budget)`, regime and temperature."""
    return approx_errors(
        equal_budget_kinds(budget), length, heads, head_dim, temperatures, regimes, seeds
    )


def approx_errors(
    kinds: dict[str, tuple[str, dict, int]],
    length: int,
    heads: int,
    head_dim: int,
    temperatures: tuple[float, ...] = TEMPERATURES,
    regimes: tuple[str, ...] = REGIMES,
    seeds: int = 3,
) -> list[ApproxRow]:
    """Mean relative error against exact attention for each label -> (kind, options, budget)."""
    rows = []
    for regime in regimes:
        for temperature in temperatures:
            errors = {label: 0.0 for label in kinds}
            for seed in range(seeds):
                q, k, v = make_inputs(regime, temperature, length, heads, head_dim, seed)
                exact = reference_attention(FullAttention(head_dim), q, k, v)
                for label, (kind, options, _) in kinds.items():
                    attn = build_attention(kind, head_dim=head_dim, **_seeded(kind, options, seed))
                    out = attn(q, k, v)
                    errors[label] += float((out - exact).norm() / exact.norm()) / seeds
            rows += [
                ApproxRow(label, regime, temperature, kinds[label][2], error)
                for label, error in errors.items()
            ]
    return rows


def _seeded(kind: str, options: dict, seed: int) -> dict:
    """`options` with `seed` for the kinds that draw random projections."""
    takes_seed = "seed" in inspect.signature(KINDS[kind]).parameters
    return {**options, "seed": seed} if takes_seed else options


def make_inputs(
    regime: str, temperature: float, length: int, heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (1, heads, length, head_dim) float64 for `regime`, scaled to `temperature`."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    shape = (1, heads, length, head_dim)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if regime == "random":
        q, k = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    elif regime == "drift":
        walk = torch.randn(shape, generator=gen, dtype=torch.float64).cumsum(dim=2)
        walk = walk / walk.std(dim=2, keepdim=True)  # unit spread over the sequence
        noise = [0.3 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
        q, k = walk + noise[0], walk + noise[1]
    else:
        raise ValueError(f"unknown regime {regime!r} (choose from {', '.join(REGIMES)})")
    scores = head_dim**-0.5 * q @ k.transpose(-1, -2)
    past = torch.ones(length, length, dtype=torch.bool).tril()
    rms = scores[..., past].pow(2).mean().sqrt()
    scale = math.sqrt(temperature / float(rms))
    return q * scale, k * scale, v


def mean_error(rows: list[ApproxRow], kind: str) -> float:
    """`kind`'s error averaged over every regime and temperature in `rows`."""
    errors = [r.error for r in rows if r.kind == kind]
    return sum(errors) / len(errors)


def format_rows(rows: list[ApproxRow]) -> str:
    """A table per regime: one line per temperature, one column per kind."""
    kinds = list(dict.fromkeys(r.kind for r in rows))
    lines = []
    for regime in dict.fromkeys(r.regime for r in rows):
        budgets = {r.kind: r.budget for r in rows if r.regime == regime}
        lines.append(f"regime {regime}: " + ", ".join(f"{k} budget {budgets[k]}" for k in kinds))
        lines.append(f"{'rms tau q.k':>12}" + "".join(f"{k:>14}" for k in kinds))
        for temperature in dict.fromkeys(r.temperature for r in rows if r.regime == regime):
            here = [r for r in rows if (r.regime, r.temperature) == (regime, temperature)]
            cells = {r.kind: r.error for r in here}
            lines.append(f"{temperature:>12g}" + "".join(f"{cells[k]:>14.4f}" for k in kinds))
    return "\n".join(lines)


def main(
    budget: int = 64,
    length: int = 1024,
    heads: int = 4,
    head_dim: int = 64,
    seeds: int = 3,
    out: str | None = None,
) -> dict:
    """`sbtrain bench approx`: measure, print the table, write JSON to `out`."""
    from sbtrain import bench

    if budget % 4:
        raise UserError(
            f"--budget {budget}: use a multiple of 4 (scatterbrain splits it into a window and "
            "an even number of features, LSH into 2 rounds)"
        )
    if length < 2:
        raise UserError(f"--length {length}: the drift regime needs at least 2 positions")
    rows = run_approx_bench(budget, length, heads, head_dim, seeds=seeds)
    settings = {
        "budget": budget,
        "length": length,
        "heads": heads,
        "head_dim": head_dim,
        "seeds": seeds,
    }
    kinds = dict.fromkeys(r.kind for r in rows)
    meta = {
        "machine": bench.machine(),
        "settings": settings,
        "mean_error": {k: mean_error(rows, k) for k in kinds},
    }
    rows_json = [dataclasses.asdict(r) for r in rows]
    return bench.report("approx", rows_json, out, meta, text=format_rows(rows))
