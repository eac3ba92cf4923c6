"""What a model scores: the loss (and accuracy) of a model over a dataset, by position if asked,
and the validation that training runs at intervals (split over processes, the best kept).

    s = score(model, task, dataset, range(len(dataset)), 8, device, "fp32")
    s.loss_nats, s.ppl, s.accuracy
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sbtrain import distributed
from sbtrain.batch import IGNORE, chunk, unscored
from sbtrain.distributed import Layout
from sbtrain.tasks import Task


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
    samples: int = 0  # samples with a scored target, when exact matches are counted
    exact: int = 0  # of those, the samples whose every scored target is predicted exactly

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

    @property
    def exact_match(self) -> float:
        return self.exact / max(self.samples, 1)

    def add(self, other: Score) -> None:
        for name in ("nll", "tokens", "correct", "samples", "exact"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
    shard=None,
) -> Score:
    """Sum the NLL (and, where the task counts them, argmax hits) of `dataset[i]` for i in
    `indices`, `batch_size` at a time (and per bucket of positions into `by_position`). An
    index None stands for a sample with nothing scored; with a context-parallel `shard`, this
    process scores its chunk of each sequence."""
    was_training = model.training
    model.eval()
    total = Score()
    try:
        for start in range(0, len(indices), batch_size):
            batch = [
                dataset[i] if i is not None else unscored(dataset[0])
                for i in indices[start : start + batch_size]
            ]
            collated = chunk(task.collate(batch), shard, task.context_length)
            *inputs, targets = (t.to(device) for t in collated)
            with autocast(device, precision):
                hidden = model(*inputs)
            nll = model.token_nll(hidden.float(), targets)
            if by_position is not None:
                by_position.add(nll, targets)
            total.add(batch_score(model, task, hidden, targets, nll))
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return total


def batch_score(model, task: Task, hidden: torch.Tensor, targets: torch.Tensor, nll) -> Score:
    """The score of one batch: `nll` (N,) of its scored `targets` (B, ...), and where the task
    counts them, argmax hits and the samples whose every scored target is hit."""
    s = Score(nll=nll.double().sum().item(), tokens=nll.numel())
    if not task.counts_correct:
        return s
    scored = targets != IGNORE
    hits = model.predict(hidden[scored].float()) == targets[scored]
    s.correct = int(hits.sum())
    if task.exact_match:
        missed = torch.zeros_like(scored)
        missed[scored] = ~hits
        rows = scored.flatten(1).any(1)
        s.samples = int(rows.sum())
        s.exact = int((rows & ~missed.flatten(1).any(1)).sum())
    return s


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


class Validator:
    """The validation set scored during training, split over processes and summed; the best value
    so far of the task's metric (`Task.best_metric`: loss, lower is better, or accuracy, higher),
    which checkpoint_best.pt follows, and the validations since it improved (train.patience)."""

    def __init__(
        self, task: Task, dataset, batch_size: int, layout: Layout, precision: str,
        max_batches: int | None,
    ):  # fmt: skip
        self.task, self.dataset, self.batch_size = task, dataset, batch_size
        self.layout, self.precision, self.max_batches = layout, precision, max_batches
        self.metric = task.best_metric
        self.best, self.bad_validations = self.worst(), 0

    def worst(self) -> float:
        return math.inf if self.metric == "loss" else -math.inf

    def value(self, s: Score) -> float:
        return s.loss_nats if self.metric == "loss" else s.accuracy

    def validate(self, model: torch.nn.Module) -> tuple[Score | None, bool]:
        """The validation score (None without a validation set) and whether it is the best so
        far (without a validation set, every checkpoint is the latest and so the best)."""
        if self.dataset is None:
            return None, True
        layout = self.layout
        n = len(self.dataset)
        if self.max_batches:
            n = min(n, self.max_batches * self.batch_size * layout.dp_size)
        # the same number of samples on every process (their collectives must match): the
        # shares of the last ones are filled with samples that score nothing
        mine = list(range(layout.dp_rank, n, layout.dp_size))
        mine += [None] * (-(-n // layout.dp_size) - len(mine))
        device, shard = layout.device, getattr(model, "shard", None)
        s = score(model, self.task, self.dataset, mine, self.batch_size, device, self.precision,
                  shard=shard)  # fmt: skip
        summed = [s.nll, s.tokens, s.correct, s.samples, s.exact]
        counts = distributed.all_reduce_sum(summed, device)
        s = Score(counts[0], *map(int, counts[1:]))
        value = self.value(s)
        improved = value < self.best if self.metric == "loss" else value > self.best
        if improved:
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        return s, improved

    def record(self, s: Score) -> dict:
        """The log record of a validation score (loss in bits, as fairseq logs it)."""
        record = {"loss": s.loss_bits, "nll_nats": s.loss_nats, "ppl": s.ppl, "tokens": s.tokens}
        if self.task.counts_correct:
            record["accuracy"] = s.accuracy
        if self.task.exact_match:
            record["exact_match"] = s.exact_match
        if self.metric == "loss":
            record["best_loss"] = self.best / math.log(2)
        else:
            record["best_accuracy"] = self.best
        return record

    def best_text(self) -> str:
        if self.metric == "loss":
            return f"best valid loss {self.best / math.log(2):.4f} bits"
        return f"best valid accuracy {100 * self.best:.2f}%"

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.bad_validations >= patience

    def state_dict(self) -> dict:
        return {"best_valid": self.best, "best_metric": self.metric,
                "bad_validations": self.bad_validations}  # fmt: skip

    def load_state_dict(self, state: dict) -> bool:
        """Continue from `state`; False (and a fresh best) when it followed another metric
        (checkpoints before best_checkpoint_metric followed the loss)."""
        if state.get("best_metric", "loss") != self.metric:
            self.best, self.bad_validations = self.worst(), 0
            return False
        self.best, self.bad_validations = state["best_valid"], state["bad_validations"]
        return True
