"""`sbtrain bench train RECIPE... [--lengths L,...]`: tokens/s, step time and peak memory of real
training steps, per recipe and length, each case in a fresh process.

The steps are the trainer's own (autocast, loss scaling, clipping, AdamW) on random tokens of the
recipe's shapes, so no data is needed; the first `warmup` steps are not timed. `--breakdown` also
times the parts of a step alone at the step's shapes (forward + backward, recomputation included):
every layer's attention sublayer, every feed-forward sublayer, the output layer; `other_ms` is
what remains of the step (embeddings, final LayerNorm's share, clipping, the optimizer).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from sbtrain import allocator, bench
from sbtrain.attention import dispatch
from sbtrain.bench import parallel as bench_parallel
from sbtrain.config import Recipe
from sbtrain.distributed import Layout, pick_device
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM, count_parameters
from sbtrain.tasks import get_task, load_recipe
from sbtrain.trainer import Trainer


def bench_train(
    recipe: Recipe,
    vocab_size: int,
    steps: int = 10,
    warmup: int = 2,
    breakdown: bool = False,
    name: str = "",
) -> dict:
    """Time `steps` updates after `warmup` ones; returns one row (`name`: the recipe's)."""
    load = os.getloadavg()[0]  # the machine's load before this case (others' work skews it)
    device = pick_device(recipe.train.device)
    data = bench.synthetic_data(recipe, vocab_size, recipe.train.batch_size * (steps + warmup))
    trainer = Trainer(recipe, Layout(0, 1, device), data)
    batches = trainer.sampler.epoch_batches()
    dataset = data.train_set(1)
    for _ in range(warmup):
        trainer.train_step(next(batches), dataset)
    seconds, usage, rss = timed_steps(lambda: trainer.train_step(next(batches), dataset), steps,
                                      device)  # fmt: skip
    length = trainer.task.context_length
    tokens = recipe.train.batch_size * length
    row = {
        "recipe": name,
        "attention": recipe.model.attention.kind,
        "sparse": recipe.model.attention.sparse,
        "length": length,
        "batch": recipe.train.batch_size,
        "params": count_parameters(trainer.model),
        "precision": recipe.train.precision,
        "attention_impl": recipe.train.attention_impl,
        "fallbacks": dispatch.fallbacks(),  # why `auto` took the PyTorch path, if it did
        "checkpointing": recipe.train.activation_checkpointing,
        "step_ms": 1000 * seconds,
        "tokens_per_s": tokens / seconds,
        **usage,
        "allocator": allocator.loaded(),
        "rss_mib_after_steps": rss,
        "load_before": load,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        row["peak_mib"] = peak
    else:
        peak = row["peak_rss_mib"] = bench.peak_rss_mib()
    row["peak_kib_per_token"] = 1024 * peak / tokens
    if breakdown:
        shape = (trainer.micro, length)
        micro_batches = recipe.train.batch_size // trainer.micro  # one process here
        parts = time_parts(trainer.model, shape, vocab_size, device, micro_batches)
        row.update({f"{name}_ms": 1000 * s for name, s in parts.items()})
        row["other_ms"] = row["step_ms"] - 1000 * sum(parts.values())
    return {"machine": bench.machine(device), "device": str(device), "row": row}


def timed_steps(step, steps: int, device: torch.device) -> tuple[float, dict, list[int]]:
    """Seconds per call of `step` over `steps` calls; per call the CPU time in user space and in
    the kernel (page faults' share) and the minor page faults; resident MiB after each call
    (whether memory keeps growing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rss = []
    for _ in range(steps):
        step()
        rss.append(round(bench.rss_mib()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = {
        "user_s": (after.ru_utime - before.ru_utime) / steps,
        "sys_s": (after.ru_stime - before.ru_stime) / steps,
        "minor_faults": (after.ru_minflt - before.ru_minflt) / steps,
    }
    return seconds, usage, rss


def time_parts(
    model: TransformerLM,
    shape: tuple[int, int],
    vocab_size: int,
    device: torch.device,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Seconds one training step of micro-batches of `shape` (B, T) spends in the attention
    sublayers, the feed-forward sublayers and the output layer: each timed alone (forward and
    backward; with activation checkpointing, the recomputed forward too) on the model's own
    modules, in fp32, and multiplied by the layers and micro-batches of a step."""
    block = model.blocks[0]
    targets = torch.randint(0, vocab_size, shape, device=device)

    def output(x):
        return model.token_nll(model.ln_f(x), targets)

    n_layers, recompute = len(model.blocks), model.activation_checkpointing
    x = torch.randn(*shape, model.cfg.d_model, device=device, requires_grad=True)
    times = {}
    for name, part, count in (
        ("attention", block.attend, n_layers),
        ("feed_forward", block.feed_forward, n_layers),
        ("output", output, 1),
    ):
        run = part
        if recompute and part is not output:  # the output layer recomputes its chunks anyway
            run = lambda x, part=part: checkpoint(part, x, use_reentrant=False)  # noqa: E731
        seconds = _seconds(lambda run=run: run(x).sum().backward(), device)
        times[name] = count * micro_batches * seconds
    return times


def _seconds(work, device: torch.device) -> float:
    """Wall time of `work()`, after one untimed call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(
    recipes: list[str],
    steps: int = 10,
    warmup: int = 2,
    vocab_size: int = 32000,
    lengths: list[int] | None = None,
    checkpointing: str | None = None,
    breakdown: bool = False,
    out: str | None = None,
    processes: int = 1,
    parallel: str = "ddp",
    context_parallel: list[int] | None = None,
) -> dict:
    """`sbtrain bench train RECIPE... [key=value...]`: one row per recipe, length and
    checkpointing setting (`on`, `off`, `both`; default: the recipe's), side by side. With
    `processes` > 1, fsdp or `context_parallel` sizes: multi-process rows (bench.parallel)."""
    paths = [r for r in recipes if "=" not in r]
    overrides = [r for r in recipes if "=" in r]
    if not paths:
        raise UserError("bench train: give at least one recipe")
    if processes > 1 or parallel == "fsdp" or context_parallel:
        found = bench_parallel.rows(
            paths, overrides, lengths or [None], processes, parallel, context_parallel or [1],
            steps, warmup, vocab_size,
        )  # fmt: skip
        settings = dict(recipes=paths, overrides=overrides, steps=steps, warmup=warmup,
                        vocab_size=vocab_size, processes=processes, parallel=parallel)  # fmt: skip
        meta = {"machine": bench.machine(), "settings": settings}
        return bench.report("train-parallel", found, out, meta)
    cases = load_cases(paths, overrides, lengths, checkpointing)  # all checked before any run
    rows, where = [], None
    for name, recipe in cases:  # a fresh process each, so peak memory is each case's own
        task = get_task(recipe)  # a task without data files makes its own vocabulary (copy)
        vocab = task.training_data().vocab_size if recipe.data is None else vocab_size
        what = f"{name} at length {task.context_length}"
        args = (recipe, vocab, steps, warmup, breakdown, name)
        result = bench.in_fresh_process(what, bench_train, *args)
        rows.append(result["row"])
        where = result["machine"]
    settings = {
        "recipes": paths,
        "overrides": overrides,
        "steps": steps,
        "warmup": warmup,
        "vocab_size": vocab_size,
        "lengths": lengths,
        "checkpointing": checkpointing,
    }
    return bench.report("train", rows, out, {"machine": where, "settings": settings})


def load_cases(
    paths: list[str], overrides: list[str], lengths: list[int] | None, checkpointing: str | None
) -> list[tuple[str, Recipe]]:
    """(name, recipe) for each recipe x length x checkpointing setting (`on`, `off`, `both`;
    default: the recipe's); a UserError for a recipe bench train cannot time."""
    settings = {"on": ["true"], "off": ["false"], "both": ["false", "true"], None: [None]}
    cases = []
    for path in paths:
        if lengths and load_recipe(path, overrides).data is None:
            raise UserError(
                f"bench train --lengths: {path} is a copy-task recipe; "
                "set its length with copy.length=N instead"
            )
        for length in lengths or [None]:
            for setting in settings[checkpointing]:
                extra = [] if length is None else [f"data.tokens_per_sample={length}"]
                extra += [] if setting is None else [f"train.activation_checkpointing={setting}"]
                recipe = load_recipe(path, [*overrides, *extra])
                if get_task(recipe).unit != "tokens":
                    raise UserError(
                        f"bench train: {path} is a {recipe.task} classifier; bench train times "
                        "language models (lm, copy)"
                    )
                cases.append((Path(path).stem, recipe))
    return cases
