"""Benchmarks: measured speed, memory and approximation error, printed as tables and saved as JSON.

examples:
  sbtrain bench attention --lengths 2048,4096,8192,16384 --out benchmarks/results/attention-cpu.json
  sbtrain bench approx --budget 64 --length 1024 --out benchmarks/results/approx.json
  sbtrain bench train recipes/wt103.yaml recipes/wt103-full.yaml train.batch_size=2 --steps 5
  sbtrain bench preprocess --megabytes 500 --workers 2
  sbtrain bench generate --contexts 1024,4096,16384
  sbtrain bench kernels --out benchmarks/results/kernels-h100.json        # CUDA + Triton only
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing

from sbtrain import bench
from sbtrain.errors import UserError


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = sub.add_parser("attention", help="forward+backward time and peak memory per kind vs length")
    a.add_argument("--kinds", type=words, help="labels of sbtrain.bench.attention.BENCH_KINDS")
    a.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384])
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--heads", type=int, default=8)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--device", default="cpu")
    a.add_argument("--repeats", type=int, default=2, help="timed passes; the best is kept")

    x = sub.add_parser("approx", help="relative error vs exact attention at an equal budget")
    x.add_argument("--budget", type=int, default=64, help="keys/features per query")
    x.add_argument("--length", type=int, default=1024)
    x.add_argument("--heads", type=int, default=4)
    x.add_argument("--head-dim", type=int, default=64)
    x.add_argument("--seeds", type=int, default=3)

    t = sub.add_parser("train", help="tokens/s, step time, peak memory of training steps")
    t.add_argument(
        "recipes",
        nargs="+",
        metavar="RECIPE|key=value",
        help="recipes to compare, then overrides applied to each",
    )
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--vocab-size", type=int, default=32000, help="for lm recipes (random tokens)")

    p = sub.add_parser("preprocess", help="MB/s and peak RSS of preprocess on a generated corpus")
    p.add_argument("--megabytes", type=float, default=500)
    p.add_argument("--tokenizers", type=words, default=["word", "sentencepiece"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", help="where the corpus is generated (default: a temp folder)")

    g = sub.add_parser("generate", help="time and cache memory per generated token vs context")
    g.add_argument("--kinds", type=words, default=["full", "local", "performer", "scatterbrain"])
    g.add_argument("--contexts", type=ints, default=[1024, 4096, 16384])
    g.add_argument("--steps", type=int, default=32)
    g.add_argument("--device", default="cpu")

    k = sub.add_parser("kernels", help="Triton kernels vs SDPA vs the PyTorch path (CUDA)")
    k.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384])
    k.add_argument("--tokens", type=int, default=32768, help="batch x length per call")
    k.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    k.add_argument("--repeats", type=int, default=20)
    k.add_argument("--blocks", type=ints, default=[32, 64, 128], help="kernel block sizes to try")

    for each in (a, x, t, p, g, k):
        each.add_argument("--out", help="also write the JSON result to this file")
    return parser


def run(args: argparse.Namespace) -> int:
    runners = {
        "attention": _attention,
        "approx": _approx,
        "train": _train,
        "preprocess": _preprocess,
        "generate": _generate,
        "kernels": _kernels,
    }
    runners[args.what](args)
    return 0


def _attention(args) -> None:
    from sbtrain.bench.attention import BENCH_KINDS, memory_growth, run_attention_bench

    unknown = set(args.kinds or ()) - set(BENCH_KINDS)
    if unknown:
        raise UserError(
            f"--kinds: unknown {', '.join(sorted(unknown))} (have {', '.join(BENCH_KINDS)})"
        )
    kinds = {k: BENCH_KINDS[k] for k in args.kinds} if args.kinds else BENCH_KINDS
    rows = run_attention_bench(
        kinds, tuple(args.lengths), args.batch, args.heads, args.head_dim, args.device, args.repeats
    )
    settings = {
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "device": args.device,
        "kinds": {k: list(v) for k, v in kinds.items()},
    }
    bench.report(
        "attention",
        [dataclasses.asdict(r) for r in rows],
        args.out,
        {
            "machine": bench.machine(),
            "settings": settings,
            "memory_ratio_per_step": memory_growth(rows),
        },
    )


def _approx(args) -> None:
    from sbtrain.bench.approx import mean_error, run_approx_bench

    rows = run_approx_bench(args.budget, args.length, args.heads, args.head_dim, seeds=args.seeds)
    kinds = dict.fromkeys(r.kind for r in rows)
    settings = {
        "budget": args.budget,
        "length": args.length,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "seeds": args.seeds,
    }
    bench.report(
        "approx",
        [dataclasses.asdict(r) for r in rows],
        args.out,
        {
            "machine": bench.machine(),
            "settings": settings,
            "mean_error": {k: mean_error(rows, k) for k in kinds},
        },
    )


def _train(args) -> None:
    from sbtrain.config import load_recipe

    paths = [r for r in args.recipes if "=" not in r]
    overrides = [r for r in args.recipes if "=" in r]
    if not paths:
        raise UserError("bench train: give at least one recipe")
    recipes = [load_recipe(path, overrides) for path in paths]  # all checked before any run
    rows, machine = [], None
    for recipe in recipes:  # a fresh process each, so peak memory is each recipe's own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            result = pool.apply(_bench_one, (recipe, args.vocab_size, args.steps, args.warmup))
        rows.append(result["row"])
        machine = result["machine"]
    bench.report(
        "train",
        rows,
        args.out,
        {
            "machine": machine,
            "settings": {"recipes": paths, "overrides": overrides, "steps": args.steps},
        },
    )


def _bench_one(recipe, vocab_size: int, steps: int, warmup: int) -> dict:
    from sbtrain.bench.train import bench_train

    vocab = recipe.copy.n_symbols + 1 if recipe.task == "copy" else vocab_size
    return bench_train(recipe, vocab, steps, warmup)


def _preprocess(args) -> None:
    from sbtrain.bench.preprocess import bench_preprocess

    bench_preprocess(args.megabytes, args.tokenizers, args.workers, args.work_dir, args.out)


def _generate(args) -> None:
    from sbtrain.bench.generate import KINDS, bench_generate

    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        raise UserError(f"--kinds: unknown {', '.join(sorted(unknown))} (have {', '.join(KINDS)})")
    rows = bench_generate(args.kinds, args.contexts, args.steps, device=args.device)
    bench.report(
        "generate", rows, args.out, {"machine": bench.machine(), "settings": {"steps": args.steps}}
    )


def _kernels(args) -> None:
    import torch

    from sbtrain.bench.kernels import time_kernels

    if not torch.cuda.is_available():
        raise UserError("bench kernels times CUDA kernels: no CUDA device here")
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = time_kernels(
        tuple(args.lengths),
        args.tokens,
        dtype=dtype,
        repeats=args.repeats,
        blocks=tuple(args.blocks),
    )
    machine = {**bench.machine(torch.device("cuda")), "triton": triton.__version__}
    settings = {"tokens": args.tokens, "dtype": args.dtype, "repeats": args.repeats}
    bench.report("kernels", rows, args.out, {"machine": machine, "settings": settings})
