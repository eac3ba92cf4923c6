"""Benchmarks: measured speed, memory and approximation error, printed as tables and saved as JSON.

examples:
  sbtrain bench attention --lengths 2048,4096,8192,16384 --out benchmarks/results/attention-cpu.json
  sbtrain bench approx --budget 64 --length 1024 --out benchmarks/results/approx-cpu.json
  sbtrain bench approx --from-checkpoint checkpoints/wiki-leads-full/checkpoint_best.pt \
      --out benchmarks/results/approx-checkpoint-cpu.json
  sbtrain bench train recipes/wt103.yaml recipes/wt103-full.yaml train.batch_size=2 --steps 5
  sbtrain bench train recipes/wt103.yaml --lengths 2048,4096 --checkpointing both --breakdown
  sbtrain bench preprocess --megabytes 500 --workers 2
  sbtrain bench generate --contexts 1024,4096,16384
  sbtrain bench kernels --out benchmarks/results/kernels-h100.json        # CUDA + Triton only
  sbtrain bench gpt --device cuda      # a plain GPT loop of the wt103-full shape, for comparison
  sbtrain bench recall checkpoints/recall/mqar-full/checkpoint_best.pt --budgets 4,8,16,32
  sbtrain bench approx --from-checkpoint checkpoints/recall/mqar-full/checkpoint_best.pt \
      --attention scatterbrain sparse=local window=8 n_features=8   # where the top keys lie
"""

from __future__ import annotations

import argparse
import importlib

from cli.flags import parse_attention


def positive(text: str, least: int = 1) -> int:
    """An integer >= least (a size, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer >= 0."""
    return positive(text, least=0)


def ints(text: str) -> list[int]:
    """Comma-separated integers > 0 (lengths, contexts, block sizes)."""
    try:
        return [positive(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers > 0, got {text!r}"
        ) from None


def megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes > 0, got {text!r}")
    return value


def words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, (about, flags) in BENCHMARKS.items():
        each = sub.add_parser(name, help=about)
        flags(each)
        each.add_argument("--out", help="also write the JSON result to this file")
    return parser


def attention_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--kinds", type=words, help="labels of sbtrain.bench.attention.BENCH_KINDS")
    a.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384])
    a.add_argument("--batch", type=positive, default=1)
    a.add_argument("--heads", type=positive, default=8)
    a.add_argument("--head-dim", type=positive, default=64)
    a.add_argument("--device", default="cpu")
    a.add_argument("--repeats", type=positive, default=2, help="timed passes; the best is kept")
    a.add_argument(
        "--impl",
        choices=["auto", "pytorch", "fused"],
        default="auto",
        help="scatterbrain (local) / performer: fused kernels or PyTorch path",
    )


def approx_flags(x: argparse.ArgumentParser) -> None:
    x.add_argument("--budget", type=positive, default=64, help="keys/features per query")
    x.add_argument("--length", type=positive, default=1024)
    x.add_argument("--heads", type=positive, default=4)
    x.add_argument("--head-dim", type=positive, default=64)
    x.add_argument("--seeds", type=positive, default=3)
    x.add_argument(
        "--from-checkpoint",
        metavar="CKPT",
        help="q, k, v captured at every layer of this trained model instead of synthetic inputs: "
        "Performer's error per feature map as the number of features grows",
    )
    x.add_argument("--data", help="with --from-checkpoint: its data folder (default: its recipe's)")
    x.add_argument("--blocks", type=positive, default=2, help="validation blocks to capture")
    x.add_argument("--counts", type=ints, help="feature counts (default 16 ... 1024)")
    x.add_argument(
        "--attention",
        nargs="+",
        metavar="KIND|key=value",
        help="with --from-checkpoint: per layer and head, how often each query's top key (exact "
        "scores) lies in this kind's exact support, and its features' error outside it",
    )
    x.add_argument("--split", default="valid", help="with --attention: the samples to capture")


def train_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "recipes",
        nargs="+",
        metavar="RECIPE|key=value",
        help="recipes to compare, then overrides applied to each",
    )
    t.add_argument("--steps", type=positive, default=10)
    t.add_argument("--warmup", type=count, default=2)
    t.add_argument(
        "--vocab-size", type=positive, default=32000, help="for lm recipes (random tokens)"
    )
    t.add_argument("--lengths", type=ints, help="tokens per sample (default: each recipe's)")
    t.add_argument(
        "--checkpointing",
        choices=["on", "off", "both"],
        help="train.activation_checkpointing for every case, or both (default: the recipe's)",
    )
    t.add_argument(
        "--breakdown",
        action="store_true",
        help="also time attention, feed-forward and output layer of a step, each alone",
    )
    t.add_argument("--processes", type=positive, default=1, help="torchrun processes per case")
    t.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="train.parallel")
    t.add_argument(
        "--context-parallel", type=ints, help="train.context_parallel sizes, a case each"
    )


def preprocess_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megabytes", type=megabytes, default=500)
    p.add_argument("--tokenizers", type=words, default=["word", "sentencepiece"])
    p.add_argument("--workers", type=positive, default=2)
    p.add_argument("--work-dir", help="where the corpus is generated (default: a temp folder)")


def generate_flags(g: argparse.ArgumentParser) -> None:
    g.add_argument("--kinds", type=words, default=["full", "local", "performer", "scatterbrain"])
    g.add_argument("--contexts", type=ints, default=[1024, 4096, 16384])
    g.add_argument("--steps", type=positive, default=32)
    g.add_argument("--device", default="cpu")


def kernels_flags(k: argparse.ArgumentParser) -> None:
    k.add_argument("--lengths", type=ints, default=[2048, 4096, 8192, 16384])
    k.add_argument("--tokens", type=positive, default=32768, help="batch x length per call")
    k.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    k.add_argument("--repeats", type=positive, default=20)
    k.add_argument("--blocks", type=ints, default=[32, 64, 128], help="kernel block sizes to try")


def gpt_flags(gpt: argparse.ArgumentParser) -> None:
    gpt.add_argument("--vocab-size", type=positive, default=32000)
    gpt.add_argument("--length", type=positive, default=2048)
    gpt.add_argument("--batch", type=positive, default=12)
    gpt.add_argument("--layers", type=positive, default=16)
    gpt.add_argument("--d-model", type=positive, default=512, help="heads: d_model / 64")
    gpt.add_argument("--steps", type=positive, default=10)
    gpt.add_argument("--warmup", type=count, default=3)
    gpt.add_argument("--device", default="cuda")


def recall_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("checkpoint", help="a recall model trained with full attention")
    r.add_argument("--budgets", type=ints, default=[4, 8, 16, 32], help="keys or features/query")
    r.add_argument("--draws", type=positive, default=3, help="random draws of each kind")
    r.add_argument("--split", default="valid")
    r.add_argument("--data", help="its data folder (default: the recipe's data.dir)")


BENCHMARKS = {  # WHAT -> (help, its flags); `run` calls sbtrain.bench.WHAT.main(**flags)
    "attention": ("forward+backward time and peak memory per kind vs length", attention_flags),
    "approx": ("relative error vs exact attention at an equal budget", approx_flags),
    "train": ("tokens/s, step time, peak memory of training steps", train_flags),
    "preprocess": ("MB/s and peak RSS of preprocess on a generated corpus", preprocess_flags),
    "generate": ("time and cache memory per generated token vs context", generate_flags),
    "kernels": ("Triton kernels vs SDPA vs the PyTorch path (CUDA)", kernels_flags),
    "gpt": ("tokens/s of a plain GPT loop (bench train's yardstick)", gpt_flags),
    "recall": ("drop-in sweep of a recall model: accuracy vs budget per kind", recall_flags),
}


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("what", "debug")}
    if "attention" in options:
        options["attention"] = parse_attention(options["attention"])
    importlib.import_module(f"sbtrain.bench.{args.what}").main(**options)
    return 0
