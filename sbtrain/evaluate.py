"""`sbtrain eval-ppl`: one direction, one function a step: load a model (an sbtrain checkpoint,
or hf:FOLDER, a transformers causal LM that sbtrain.dropin supplies) -> the task's evaluation set
-> scoring (sbtrain.scoring) -> the record (`--json` prints it) and its text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sbtrain import checkpoint, dropin
from sbtrain.config import Recipe, TextDataConfig
from sbtrain.distributed import pick_device
from sbtrain.errors import UserError
from sbtrain.scoring import ByPosition, Score, timed_score
from sbtrain.staging import save_figure
from sbtrain.tasks import Task
from sbtrain.tasks.base import Fits
from sbtrain.tasks.lm import LanguageModelling
from sbtrain.tokenizer import HF_PREFIX


@dataclass
class Subject:
    """A model to score, wherever it came from: its task (the data it reads, how it scores),
    the check a data folder must pass, and what the record says about it."""

    path: str
    model: nn.Module  # forward(*inputs), token_nll(outputs, targets), predict(outputs)
    task: Task
    fits: Fits
    limit: int | None  # the longest block its positions allow (None: any length)
    about: dict  # trained_tokens_per_sample, positions, attention (and attention_options)


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
    """Score a split with a checkpoint (or hf:FOLDER, with `data_dir`); returns the record.

    `tokens_per_sample` scores blocks of that many tokens (default: the training length);
    `by_position` K adds `by_position`, the loss per bucket of K positions, plotted to `plot`.
    """
    check_flags(batch_size, by_position, plot)
    dev = pick_device(device)
    subject = load_subject(str(path), dev, attention, attention_impl, data_dir, tokens_per_sample)
    task = subject.task
    task.eval_options(context_window, tokens_per_sample, by_position)
    length = task.block_length(tokens_per_sample, subject.limit)
    dataset, stats = task.eval_set(split, data_dir, context_window, length, subject.fits)
    buckets = ByPosition(by_position, length) if by_position is not None else None
    s, seconds = timed_score(
        subject.model, task, dataset, split, batch_size, dev, precision, progress, buckets
    )
    result = {"checkpoint": subject.path, "split": split, **scores(task, s, seconds, stats)}
    if task.unit == "tokens":
        result.update(context_window=context_window, tokens_per_sample=length)
    result.update(subject.about)
    if buckets is not None:
        result["by_position"] = buckets.rows()
        if plot is not None:
            title = f"{subject.path} ({subject.about['attention']}), {split}"
            plot_by_position(result["by_position"], plot, title)
            result["plot"] = str(plot)
    return result


def check_flags(batch_size: int, by_position: int | None, plot: str | None) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if by_position is not None and by_position < 1:
        raise UserError(f"--by-position {by_position}: must be at least 1")
    if plot is not None:
        if by_position is None:
            raise UserError("--plot draws the --by-position buckets: give --by-position K too")
        plotting()


def load_subject(
    path: str, device, attention: dict | None, attention_impl: str | None, data_dir: str | None,
    tokens_per_sample: int | None,
) -> Subject:  # fmt: skip
    """The model of an sbtrain checkpoint, or of hf:FOLDER (see `load_hf_subject`)."""
    if path.startswith(HF_PREFIX):
        return load_hf_subject(path, device, attention, attention_impl, data_dir, tokens_per_sample)
    model, recipe, task, state = checkpoint.load_model(path, device, attention, attention_impl)
    learned = recipe.model.positions == "learned"
    about = (
        {"task": recipe.task}
        if task.unit == "examples"
        else {"trained_tokens_per_sample": task.context_length}
    )
    about.update(positions=recipe.model.positions, attention=recipe.model.attention.kind)
    fits = task.fits(state.get("model_args") or {"vocab_size": int(state["vocab_size"])})
    return Subject(path, model, task, fits, model.max_len if learned else None, about)


def load_hf_subject(
    path: str, device, attention: dict | None, attention_impl: str | None, data_dir: str | None,
    tokens_per_sample: int | None,
) -> Subject:  # fmt: skip
    """A transformers causal LM (sbtrain.dropin loads it, its attention swapped if asked),
    scored as a language model on `data_dir`, a split prepared with its tokenizer."""
    folder = Path(path.removeprefix(HF_PREFIX))
    if not folder.is_dir():
        raise UserError(f"{path}: no such folder (hf:PATH names a folder save_pretrained wrote)")
    if data_dir is None:
        raise UserError(
            f"{path}: give --data DIR, a split prepared with the model's tokenizer "
            f"(data.tokenizer: hf:{folder})"
        )
    scorer, facts = dropin.load_scorer(folder, attention, device, attention_impl)
    length = facts["length"] if tokens_per_sample is None else tokens_per_sample
    if length is None:
        raise UserError(
            f"{path}: its config names no context length (n_positions or "
            "max_position_embeddings); give --tokens-per-sample N"
        )
    data = TextDataConfig(dir=data_dir, tokens_per_sample=max(facts["length"] or length, 1))
    task = LanguageModelling(Recipe(task="lm", data=data))
    about = {
        "trained_tokens_per_sample": facts["context"],
        "positions": facts["positions"],
        "attention": facts["attention"],
    }
    if attention is not None:
        about["attention_options"] = {k: v for k, v in attention.items() if k != "kind"}

    def fits(data_folder: str, meta: dict) -> None:
        dropin.check_data(folder, data_folder, meta, scorer.lm.config)

    limit = facts["context"] if facts["bounded"] else None
    return Subject(path, scorer, task, fits, limit, about)


def scores(task: Task, s: Score, seconds: float, stats: dict | None) -> dict:
    """The figures of a score in the task's unit: examples (loss, accuracy) or tokens (loss in
    nats and bits, perplexity, accuracy where counted, word perplexity of a subword split)."""
    if task.unit == "examples":
        return {"examples": s.tokens, "loss_nats": s.loss_nats, "accuracy": s.accuracy,
                "examples_per_s": s.tokens / max(seconds, 1e-9)}  # fmt: skip
    result = {
        "tokens": s.tokens,
        "loss_nats": s.loss_nats,
        "loss_bits": s.loss_bits,
        "ppl": s.ppl,
        "tokens_per_s": s.tokens / max(seconds, 1e-9),
    }
    if task.counts_correct:
        result["accuracy"] = s.accuracy
    if task.exact_match:
        result.update(sequences=s.samples, exact_match=s.exact_match)
    if stats and stats.get("tokenizer") != "word" and "words" in stats:
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
    save_figure(fig, path, dpi=120)
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
    if "exact_match" in r:
        parts.append(f"exact match {100 * r['exact_match']:.2f}% of {r['sequences']:,}")
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
