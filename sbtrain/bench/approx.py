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
the given value (1: nearly uniform attention; 20: nearly one-hot). Performer and scatterbrain run
with every feature map (favor+, simplex, favor++; favor++'s statistic is calibrated on inputs of
another seed).

`--from-checkpoint CKPT` measures the feature maps where it matters: queries, keys and values
captured at every layer's attention of a trained model on a few validation blocks, and the
relative error of Performer's output against exact attention as the number of features grows
(`checkpoint_errors`); favor++ is calibrated on training blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from sbtrain import bench
from sbtrain.attention import RANDOM_KINDS, build_attention
from sbtrain.attention.features import FEATURES, input_statistic
from sbtrain.attention.full import FullAttention
from sbtrain.attention.performer import calibrate
from sbtrain.attention.reference import exact_support, feature_products, reference_attention
from sbtrain.batch import IGNORE
from sbtrain.checkpoint import load_model
from sbtrain.datasets import open_split
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
    kinds = {
        "local": ("local", {"window": budget}, budget),
        "lsh": ("lsh", {"n_hashes": 2, "bucket_size": half, "n_buckets": n_buckets}, budget),
    }
    for features in FEATURES:
        suffix = "" if features == "favor+" else f"-{features}"
        kinds[f"performer{suffix}"] = (
            "performer",
            {"n_features": budget, "features": features},
            budget,
        )
        kinds[f"scatterbrain{suffix}"] = (
            "scatterbrain",
            {"sparse": "local", "window": half, "n_features": half, "features": features},
            budget,
        )
    return kinds


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
                other = make_inputs(regime, temperature, length, heads, head_dim, seed + 1000)
                for label, (kind, options, _) in kinds.items():
                    attn = build_attention(kind, head_dim=head_dim, **_seeded(kind, options, seed))
                    if "features" in options:
                        calibrate(attn, other[0], other[1])
                    out = attn(q, k, v)
                    errors[label] += float((out - exact).norm() / exact.norm()) / seeds
            rows += [
                ApproxRow(label, regime, temperature, kinds[label][2], error)
                for label, error in errors.items()
            ]
    return rows


def _seeded(kind: str, options: dict, seed: int) -> dict:
    """`options` with `seed` for the kinds that draw random projections."""
    return {**options, "seed": seed} if kind in RANDOM_KINDS else options


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
    from_checkpoint: str | None = None,
    data: str | None = None,
    blocks: int = 2,
    counts: list[int] | None = None,
    attention: dict | None = None,
    split: str = "valid",
) -> dict:
    """`sbtrain bench approx`: measure, print the table, write JSON to `out`."""
    if attention is not None:
        if from_checkpoint is None:
            raise UserError("--attention measures a trained model: give --from-checkpoint CKPT")
        return main_support(from_checkpoint, attention, split, data, blocks, out)
    if from_checkpoint is not None:
        counts = tuple(counts or FEATURE_COUNTS)
        if any(n % 2 for n in counts):
            raise UserError(f"--counts {list(counts)}: feature counts must be even")
        return main_checkpoint(from_checkpoint, data, blocks, seeds, counts, out)

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


# ---------------------------------------------------------------------------------------------
# inputs captured from a trained model

FEATURE_COUNTS = (16, 32, 64, 128, 256, 512, 1024)


def capture_attention_inputs(model, *inputs: torch.Tensor) -> list[tuple]:
    """(q, k, v, hash_qk) at every layer's attention kernel, (B, H, L, D) float64 (hash_qk: the
    unrotated (q, k) LSH hashes with rotary positions, else None), for the model's `inputs`
    (token blocks (B, L)): forward hooks on the kernels' inputs during one no-grad forward."""
    captured: list[tuple] = []
    kernels = [block.attn.kernel for block in model.blocks]

    def hook(module, args, kwargs):
        hashed = kwargs.get("hash_qk")
        hashed = None if hashed is None else tuple(x.detach().double() for x in hashed)
        captured.append((*(x.detach().double() for x in args[:3]), hashed))

    handles = [kernel.register_forward_pre_hook(hook, with_kwargs=True) for kernel in kernels]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def split_blocks(folder: str, split: str, length: int, count: int, vocab_size: int):
    """The first `count` blocks (count, length) of a preprocessed split's tokens."""
    tokens, meta = open_split(folder, split)
    if int(meta["vocab_size"]) != vocab_size:
        raise UserError(
            f"{folder} has a vocabulary of {meta['vocab_size']}, the model {vocab_size}: give "
            "the folder it was trained on with --data"
        )
    if len(tokens) < count * length:
        raise UserError(f"{folder}: split {split} has fewer than {count} blocks of {length}")
    return torch.as_tensor(tokens[: count * length].astype("int64")).view(count, length)


def checkpoint_errors(
    path: str,
    data_dir: str | None = None,
    blocks: int = 2,
    counts: tuple[int, ...] = FEATURE_COUNTS,
    seeds: int = 3,
    features: tuple[str, ...] = FEATURES,
) -> list[dict]:
    """Rows {layer, features, n_features, error, error_std, statistic (favor++'s S from the
    training blocks)}: Performer's mean relative output
    error (over `seeds` draws) against exact causal attention, on q, k, v captured at each layer
    of the checkpoint's model on `blocks` validation blocks."""
    model, recipe, _, state = load_model(path, torch.device("cpu"))
    folder = data_dir or recipe.data.dir
    length, vocab = recipe.data.tokens_per_sample, int(state["vocab_size"])
    valid = capture_attention_inputs(model, split_blocks(folder, "valid", length, blocks, vocab))
    train = capture_attention_inputs(model, split_blocks(folder, "train", length, blocks, vocab))
    head_dim = valid[0][0].shape[-1]
    rows = []
    for layer, ((q, k, v, _), (cq, ck, _, _)) in enumerate(zip(valid, train)):
        exact = reference_attention(FullAttention(head_dim), q, k, v)
        statistic = float(input_statistic(cq, ck, head_dim**-0.5))  # favor++'s S of this layer
        for name in features:
            for n in counts:
                errors = []
                for seed in range(seeds):
                    attn = build_attention(
                        "performer", head_dim=head_dim, n_features=n, seed=seed, features=name
                    )
                    calibrate(attn, cq, ck)
                    out = attn(q, k, v)
                    errors.append(float((out - exact).norm() / exact.norm()))
                mean = sum(errors) / seeds
                spread = (sum((e - mean) ** 2 for e in errors) / max(seeds - 1, 1)) ** 0.5
                rows.append(dict(layer=layer, features=name, n_features=n, error=mean,
                                 error_std=spread, statistic=statistic))  # fmt: skip
    return rows


def stops_improving(rows: list[dict], gain: float = 0.1) -> dict[str, int | None]:
    """Per `features` (errors averaged over layers): the count from which no further doubling
    lowers the error by `gain` (10%) or more; None if the last doubling still does."""
    out = {}
    for name in dict.fromkeys(r["features"] for r in rows):
        by_count: dict[int, list[float]] = {}
        for r in rows:
            if r["features"] == name:
                by_count.setdefault(r["n_features"], []).append(r["error"])
        curve = sorted((n, sum(e) / len(e)) for n, e in by_count.items())
        gains = [(n, after <= (1 - gain) * e) for (n, e), (_, after) in itertools.pairwise(curve)]
        if not gains or gains[-1][1]:
            out[name] = None
            continue
        last_gain = max((i for i, (_, gained) in enumerate(gains) if gained), default=-1)
        out[name] = gains[last_gain + 1][0]
    return out


def main_checkpoint(
    path: str, data_dir: str | None, blocks: int, seeds: int, counts: tuple[int, ...], out
) -> dict:
    rows = checkpoint_errors(path, data_dir, blocks, counts, seeds)
    meta = {
        "machine": bench.machine(),
        "settings": {
            "checkpoint": str(path),
            "data": data_dir,
            "blocks": blocks,
            "seeds": seeds,
            "counts": list(counts),
        },
        "stops_improving": stops_improving(rows),
    }
    return bench.report("approx-checkpoint", rows, out, meta)


# ---------------------------------------------------------------------------------------------
# where a trained model's top keys lie: inside a kind's exact support, or left to its features


def support_rows(
    path: str, attention: dict, split: str = "valid", data_dir: str | None = None, count: int = 64
) -> list[dict]:
    """Per layer and head of checkpoint `path` (its own attention), on the first `count` samples
    of `split`: the share of queries whose highest-scoring past key (exact scores on the same
    q, k) lies inside `attention`'s exact support (window, LSH buckets), over every query and
    over the scored ones (a recall task's queries); the exact attention mass outside the support;
    and, for kinds with features, their relative error on exp(scores) outside the support."""
    device = torch.device("cpu")
    model, _, task, state = load_model(path, device, attention_impl="pytorch")
    swapped, *_ = load_model(path, device, attention, attention_impl="pytorch")
    dataset, _ = task.eval_set(split, data_dir, 0, task.context_length,
                               task.fits(state["model_args"]))  # fmt: skip
    *inputs, targets = task.collate([dataset[i] for i in range(min(count, len(dataset)))])
    scored = (targets != IGNORE).any(0) if targets.dim() == 1 else targets != IGNORE
    rows = []
    captured = capture_attention_inputs(model, *inputs)
    for layer, ((q, k, _, hash_qk), block) in enumerate(zip(captured, swapped.blocks)):
        kernel = block.attn.kernel
        stats = support_stats(kernel, q, k, hash_qk, scored)
        for head in range(q.shape[1]):
            rows.append({"layer": layer, "head": head, **{n: v[head] for n, v in stats.items()}})
    return rows


def support_stats(kernel, q, k, hash_qk, scored: torch.Tensor) -> dict[str, list[float]]:
    """Per head: top_in_support, top_in_support_scored, mass_outside and (kinds with
    features) feature_error, as described in `support_rows`."""
    length = q.shape[-2]
    past = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, L, L) float64
    scores = scores.masked_fill(~past, -math.inf)
    support = exact_support(kernel, q, k, hash_qk) & past
    top = scores.argmax(-1, keepdim=True)  # (B, H, L, 1)
    inside = support.gather(-1, top).squeeze(-1).double()  # (B, H, L)
    weights = torch.softmax(scores, -1)
    outside = (weights * ~support).sum(-1)  # (B, H, L)
    keep = scored[:, None, :].expand_as(inside)
    stats = {
        "top_in_support": inside.mean((0, 2)),
        "top_in_support_scored": (inside * keep).sum((0, 2)) / keep.sum((0, 2)).clamp(min=1),
        "mass_outside": outside.mean((0, 2)),
        "mass_outside_scored": (outside * keep).sum((0, 2)) / keep.sum((0, 2)).clamp(min=1),
    }
    if hasattr(kernel, "projection"):
        row_max = scores.amax(-1, keepdim=True)
        exact = torch.exp(scores - row_max) * (past & ~support)
        approx = feature_products(q, k, kernel) * torch.exp(-row_max) * (past & ~support)
        error = (approx - exact).abs().sum(-1) / exact.sum(-1).clamp(min=1e-300)
        has = exact.sum(-1) > 0
        stats["feature_error"] = (error * has).sum((0, 2)) / has.sum((0, 2)).clamp(min=1)
    return {name: value.tolist() for name, value in stats.items()}


def main_support(path: str, attention: dict, split: str, data_dir, count_blocks: int, out):
    rows = support_rows(path, attention, split, data_dir, count=32 * count_blocks)
    means = {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]
             if name not in ("layer", "head")}  # fmt: skip
    meta = {"machine": bench.machine(), "settings": {"checkpoint": str(path), "attention":
            attention, "split": split, "samples": 32 * count_blocks}, "mean": means}  # fmt: skip
    return bench.report("approx-support", rows, out, meta)
