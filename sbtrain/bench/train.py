"""`sbtrain bench train RECIPE`: tokens/s, step time and peak memory of real training steps.

The steps are the trainer's own (autocast, loss scaling, clipping, AdamW) on random tokens of the
recipe's shapes, so no data is needed; the first `warmup` steps are not timed.
"""

from __future__ import annotations

import time

import torch

from sbtrain import bench
from sbtrain.attention import dispatch
from sbtrain.config import Recipe, load_recipe
from sbtrain.distributed import pick_device
from sbtrain.errors import UserError
from sbtrain.model import count_parameters


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, length: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (size, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class SyntheticData:
    """Stands in for the trainer's TaskData: random tokens, no validation set."""

    def __init__(self, recipe: Recipe, vocab_size: int, n_samples: int):
        self.vocab_size, self.n_train, self.valid = vocab_size, n_samples, None
        self.dataset = RandomTokens(vocab_size, recipe.context_length, n_samples, recipe.train.seed)

    def train_set(self, epoch: int) -> RandomTokens:
        return self.dataset


def bench_train(recipe: Recipe, vocab_size: int, steps: int = 10, warmup: int = 2) -> dict:
    """Time `steps` updates after `warmup` ones; returns one row."""
    from sbtrain.distributed import Layout
    from sbtrain.trainer import Trainer

    device = pick_device(recipe.train.device)
    data = SyntheticData(recipe, vocab_size, recipe.train.batch_size * (steps + warmup))
    trainer = Trainer(recipe, Layout(0, 1, device), data)
    batches = trainer.sampler.epoch_batches()
    dataset = data.train_set(1)
    for _ in range(warmup):
        trainer.train_step(next(batches), dataset)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches), dataset)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = recipe.train.batch_size * recipe.context_length
    row = {
        "attention": recipe.model.attention.kind,
        "sparse": recipe.model.attention.sparse,
        "length": recipe.context_length,
        "batch": recipe.train.batch_size,
        "params": count_parameters(trainer.model),
        "precision": recipe.train.precision,
        "attention_impl": recipe.train.attention_impl,
        "fallbacks": dispatch.fallbacks(),  # why `auto` took the PyTorch path, if it did
        "step_ms": 1000 * seconds,
        "tokens_per_s": tokens / seconds,
    }
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_rss_mib"] = bench.peak_rss_mib()
    return {"machine": bench.machine(device), "device": str(device), "row": row}


def main(
    recipes: list[str],
    steps: int = 10,
    warmup: int = 2,
    vocab_size: int = 32000,
    out: str | None = None,
) -> dict:
    """`sbtrain bench train RECIPE... [key=value...]`: one row per recipe, side by side."""
    paths = [r for r in recipes if "=" not in r]
    overrides = [r for r in recipes if "=" in r]
    if not paths:
        raise UserError("bench train: give at least one recipe")
    loaded = [load_recipe(path, overrides) for path in paths]  # all checked before any run
    rows, where = [], None
    for recipe in loaded:  # a fresh process each, so peak memory is each recipe's own
        vocab = recipe.copy.n_symbols + 1 if recipe.task == "copy" else vocab_size
        what = f"{recipe.model.attention.kind} at length {recipe.context_length}"
        result = bench.in_fresh_process(what, bench_train, recipe, vocab, steps, warmup)
        rows.append(result["row"])
        where = result["machine"]
    settings = {"recipes": paths, "overrides": overrides, "steps": steps, "warmup": warmup}
    return bench.report("train", rows, out, {"machine": where, "settings": settings})
