"""Scoring: the loss of a model over a dataset (used by validation and `sbtrain eval-ppl`)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from sbtrain import checkpoint
from sbtrain.config import Recipe, recipe_from_dict
from sbtrain.distributed import pick_device
from sbtrain.errors import UserError
from sbtrain.model import IGNORE, prepare_model
from sbtrain.tasks import Task, get_task
from sbtrain.tokenizer import HF_PREFIX


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Score:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0  # scored targets
    correct: int = 0  # scored targets predicted exactly (argmax), when counted

    @property
    def loss_nats(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def loss_bits(self) -> float:
        return self.loss_nats / math.log(2)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss_nats, 700.0))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)


class ByPosition:
    """Summed NLL and scored tokens per bucket of `size` positions within the input block.

    The position of a target is its index in the model's input: how many earlier tokens the
    model sees when predicting it (context tokens of --context-window included).
    """

    def __init__(self, size: int, length: int):
        self.size, self.length = size, length
        n_buckets = -(-length // size)
        self.nll = torch.zeros(n_buckets, dtype=torch.float64)
        self.tokens = torch.zeros(n_buckets, dtype=torch.int64)

    def add(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        """nll (N,) of the scored targets of `targets` (B, T), in row-major order."""
        scored = targets != IGNORE
        positions = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
        bucket = (positions[scored] // self.size).cpu()
        n = len(self.tokens)
        self.nll += torch.bincount(bucket, weights=nll.detach().double().cpu(), minlength=n)
        self.tokens += torch.bincount(bucket, minlength=n)

    def rows(self) -> list[dict]:
        """One dict per bucket holding scored tokens: positions [start, end), loss, ppl."""
        rows = []
        for b, (nll, tokens) in enumerate(zip(self.nll.tolist(), self.tokens.tolist())):
            if tokens:
                loss = nll / tokens
                start, end = b * self.size, min((b + 1) * self.size, self.length)
                rows.append(dict(start=start, end=end, tokens=tokens, loss_nats=loss,
                                 ppl=math.exp(min(loss, 700.0))))  # fmt: skip
        return rows


@torch.no_grad()
def score(
    model: torch.nn.Module,
    task: Task,
    dataset,
    indices: list[int],
    batch_size: int,
    device: torch.device,
    precision: str,
    progress=None,
    by_position: ByPosition | None = None,
) -> Score:
    """Sum the NLL (and, where the task counts them, argmax hits) of `dataset[i]` for i in
    `indices`, `batch_size` at a time (and per bucket of positions into `by_position`)."""
    was_training = model.training
    model.eval()
    total = Score()
    try:
        for start in range(0, len(indices), batch_size):
            batch = [dataset[i] for i in indices[start : start + batch_size]]
            *inputs, targets = (t.to(device) for t in task.collate(batch))
            with autocast(device, precision):
                hidden = model(*inputs)
            nll = model.token_nll(hidden.float(), targets)
            total.nll += nll.double().sum().item()
            total.tokens += nll.numel()
            if by_position is not None:
                by_position.add(nll, targets)
            if task.counts_correct:
                scored = targets != IGNORE
                guess = model.predict(hidden[scored].float())
                total.correct += (guess == targets[scored]).sum().item()
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return total


# ---------------------------------------------------------------------------------------------
# sbtrain eval-ppl


def load_model(
    path: str | Path,
    device: torch.device,
    attention: dict | None = None,
    attention_impl: str | None = None,
) -> tuple[torch.nn.Module, Recipe, dict]:
    """The model of a checkpoint (its recipe gives the architecture), ready for evaluation.

    `attention` ({"kind": ..., options}) swaps every layer's attention kernel for another kind:
    the projections are kept; the new kernel's random buffers are drawn from train.seed.
    `attention_impl` (auto | pytorch | fused) replaces the recipe's train.attention_impl.
    """
    state = checkpoint.load(path)
    tree, weights = state["recipe"], state["model"]
    if attention is not None:
        tree = {**tree, "model": {**tree["model"], "attention": attention}}
        weights = {k: v for k, v in weights.items() if ".kernel." not in k}  # the old kernel's
    if attention_impl is not None:
        tree = {**tree, "train": {**tree.get("train", {}), "attention_impl": attention_impl}}
    recipe = recipe_from_dict(tree, source=f"{path} (--attention)" if attention else str(path))
    model_args = state.get("model_args") or {"vocab_size": int(state["vocab_size"])}
    model = prepare_model(recipe, lambda: get_task(recipe).build_model(**model_args))
    try:
        missing, _ = model.load_state_dict(weights, strict=attention is None)
    except RuntimeError:
        raise UserError(
            f"{path}: its weights do not fit the model its own recipe describes "
            "(written by another sbtrain version?); use another checkpoint"
        ) from None
    if any(".kernel." not in key for key in missing):
        raise UserError(f"{path}: weights missing for {missing[0]}; use another checkpoint")
    return model.to(device).eval(), recipe, state


def parse_attention(words: list[str] | None) -> dict | None:
    """`--attention KIND key=value ...` -> {"kind": KIND, key: value}, values read as YAML."""
    if not words:
        return None
    spec = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise UserError(f"--attention: expected key=value after the kind, got {word!r}")
        try:
            spec[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--attention: {word!r} is not key=value with a YAML value") from None
    return spec


def main(
    path: str | Path,
    split: str = "test",
    context_window: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    attention: dict | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    tokens_per_sample: int | None = None,
    by_position: int | None = None,
    plot: str | None = None,
    attention_impl: str | None = None,
) -> dict:
    """Score a split with a checkpoint; returns the result record (`--json` prints it).

    `tokens_per_sample` scores blocks of that many tokens (default: the training length);
    `by_position` K adds `by_position`, the loss per bucket of K positions, plotted to `plot`.
    `path` hf:FOLDER scores a transformers causal LM instead (sbtrain.dropin; `data_dir` needed).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if by_position is not None and by_position < 1:
        raise UserError(f"--by-position {by_position}: must be at least 1")
    if plot is not None:
        if by_position is None:
            raise UserError("--plot draws the --by-position buckets: give --by-position K too")
        plotting()
    if str(path).startswith(HF_PREFIX):  # a transformers folder: sbtrain.dropin scores it
        from sbtrain import dropin

        return dropin.eval_ppl(
            str(path), split=split, data_dir=data_dir, attention=attention,
            context_window=context_window, tokens_per_sample=tokens_per_sample,
            batch_size=batch_size, device=device, precision=precision, progress=progress,
            by_position=by_position, plot=plot, attention_impl=attention_impl,
        )  # fmt: skip
    dev = pick_device(device)
    model, recipe, state = load_model(path, dev, attention, attention_impl)
    task = get_task(recipe)
    task.eval_options(context_window, tokens_per_sample, by_position)
    length = task.block_length(model, tokens_per_sample)
    dataset, stats = task.eval_set(split, state, data_dir, context_window, length)
    buckets = ByPosition(by_position, length) if by_position is not None else None
    s, seconds = timed_score(
        model, task, dataset, split, batch_size, dev, precision, progress, buckets
    )
    if task.unit == "examples":
        return {
            "checkpoint": str(path),
            "split": split,
            "examples": s.tokens,
            "loss_nats": s.loss_nats,
            "accuracy": s.accuracy,
            "examples_per_s": s.tokens / max(seconds, 1e-9),
            "task": recipe.task,
            "positions": recipe.model.positions,
            "attention": recipe.model.attention.kind,
        }
    about = {
        "context_window": context_window,
        "tokens_per_sample": length,
        "trained_tokens_per_sample": recipe.context_length,
        "positions": recipe.model.positions,
        "attention": recipe.model.attention.kind,
    }
    title = f"{path} ({recipe.model.attention.kind}, {recipe.model.positions}), {split}"
    return lm_record(s, seconds, str(path), split, about, buckets, plot, title, task, stats)


def timed_score(
    model: torch.nn.Module,
    task: Task,
    dataset,
    split: str,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: bool,
    buckets: ByPosition | None,
) -> tuple[Score, float]:
    """`score` of every item of `dataset` (a progress bar when `progress` and stderr is a
    terminal); returns the score and the seconds it took."""
    interactive = progress and sys.stderr.isatty()
    with tqdm(
        total=len(dataset), desc=f"eval {split}", unit="seq", disable=not interactive, leave=False
    ) as bar:
        start = time.perf_counter()
        indices = list(range(len(dataset)))
        s = score(model, task, dataset, indices, batch_size, device, precision, bar, buckets)
        return s, time.perf_counter() - start


def lm_record(
    s: Score,
    seconds: float,
    checkpoint: str,
    split: str,
    about: dict,
    buckets: ByPosition | None,
    plot: str | None,
    title: str,
    task: Task,
    stats: dict | None,
) -> dict:
    """eval-ppl's record of a language model: the scores, then `about` (context_window,
    tokens_per_sample, ..., attention), the `buckets` rows (plotted to `plot` under `title`),
    accuracy where the task counts it, and word perplexity where `stats` (the split's statistics
    and its "tokenizer" kind) count words of a subword split."""
    result = {
        "checkpoint": checkpoint,
        "split": split,
        "tokens": s.tokens,
        "loss_nats": s.loss_nats,
        "loss_bits": s.loss_bits,
        "ppl": s.ppl,
        "tokens_per_s": s.tokens / max(seconds, 1e-9),
        **about,
    }
    if buckets is not None:
        result["by_position"] = buckets.rows()
        if plot is not None:
            plot_by_position(result["by_position"], plot, title)
            result["plot"] = str(plot)
    if task.counts_correct:
        result["accuracy"] = s.accuracy
    if stats and stats["tokenizer"] != "word" and "words" in stats:
        words = stats["words"] + stats["lines"]  # each end-of-line counts as a word
        result["word_ppl"] = math.exp(min(s.nll / max(words, 1), 700.0))
    return result


def plotting():
    """matplotlib.pyplot, drawing to files only; a UserError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "--plot needs matplotlib: pip install 'sbtrain[plot]' (or leave --plot out)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_by_position(rows: list[dict], path: str | Path, title: str) -> None:
    """A PNG of perplexity against position (bucket middles), log-scaled perplexity."""
    plt = plotting()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(r["start"] + r["end"] - 1) / 2 for r in rows], [r["ppl"] for r in rows], marker=".")
    ax.set(xlabel="position in the block", ylabel="perplexity", yscale="log", title=title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_result(r: dict) -> str:
    if "examples" in r:  # a classifier
        return (
            f"| {r['split']}: {r['examples']:,} examples | loss {r['loss_nats']:.4f} nats | "
            f"accuracy {100 * r['accuracy']:.2f}% | {r['examples_per_s']:,.1f} examples/s"
        )
    parts = [
        f"{r['split']}: {r['tokens']:,} tokens",
        f"loss {r['loss_nats']:.4f} nats",
        f"{r['loss_bits']:.4f} bits",
        f"ppl {r['ppl']:.2f}",
    ]
    if "word_ppl" in r:
        parts.append(f"word ppl {r['word_ppl']:.2f}")
    if "accuracy" in r:
        parts.append(f"accuracy {100 * r['accuracy']:.2f}%")
    parts.append(f"{r['tokens_per_s']:,.0f} tokens/s")
    lines = ["| " + " | ".join(parts)]
    if "by_position" in r:
        lines += ["| positions | tokens | loss (nats) | ppl |", "|---|---|---|---|"]
        lines += [
            f"| {b['start']}-{b['end'] - 1} | {b['tokens']:,} | {b['loss_nats']:.4f} "
            f"| {b['ppl']:.2f} |"
            for b in r["by_position"]
        ]
    return "\n".join(lines)
