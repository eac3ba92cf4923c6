"""`sbtrain train`: the training loop, resumable exactly, on one process or DDP.

    sbtrain.trainer.main(load_recipe("recipes/debug.yaml", ["train.max_updates=20"]))

Rerunning with the same `train.save_dir` resumes from `checkpoint_last.pt`: same data order,
dropout and losses as a run that was never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sbtrain import __version__, checkpoint, distributed
from sbtrain.config import Recipe
from sbtrain.datasets import CopyTask, EpochSampler, LMBlocks, collate, open_split
from sbtrain.distributed import Layout
from sbtrain.errors import UserError
from sbtrain.evaluate import Score, autocast, score
from sbtrain.metrics import Interval, Logger, peak_memory_gb
from sbtrain.model import IGNORE, TransformerLM, count_parameters
from sbtrain.optim import build_optimizer, lr_at

COPY_VALID_SEED, COPY_TEST_SEED = 10_007, 20_011  # fixed sets, the same for every run
MAX_OVERFLOWS = 25  # consecutive fp16 overflows before we give up


class Stopped(Exception):
    """Training stopped by a signal after saving checkpoint_last.pt."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# data


class TaskData:
    """The training and validation samples of a recipe, and the vocabulary size they imply."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        if recipe.task == "copy":
            self.vocab_size = recipe.copy.n_symbols + 1
            self.valid = copy_split(recipe, "valid")
            self.n_train = recipe.copy.train_size
            return
        tokens, meta = open_split(recipe.data.dir, "train")
        self.vocab_size, self.eol_id = int(meta["vocab_size"]), int(meta["eol_id"])
        length = recipe.data.tokens_per_sample
        if len(tokens) < length:
            raise UserError(
                f"data.tokens_per_sample={length} is longer than the training data "
                f"({len(tokens)} tokens in {recipe.data.dir}/train.bin); lower it"
            )
        self.train_blocks = LMBlocks(tokens, self.eol_id, length)
        self.n_train = len(self.train_blocks)
        self.valid = None
        if (Path(recipe.data.dir) / "valid.bin").is_file():
            valid_tokens, _ = open_split(recipe.data.dir, "valid")
            self.valid = LMBlocks(valid_tokens, self.eol_id, length, drop_last=False)

    def train_set(self, epoch: int):
        """Training samples of an epoch (copy: fresh sequences every epoch)."""
        if self.recipe.task == "copy":
            c = self.recipe.copy
            return CopyTask(c.n_symbols, c.length, c.train_size, self.recipe.train.seed, epoch)
        return self.train_blocks


def copy_split(recipe: Recipe, split: str) -> CopyTask:
    """The fixed copy-task evaluation sets (their seeds do not depend on the recipe)."""
    c = recipe.copy
    size, seed = (
        (c.valid_size, COPY_VALID_SEED) if split == "valid" else (c.test_size, COPY_TEST_SEED)
    )
    return CopyTask(c.n_symbols, c.length, size, seed)


# ---------------------------------------------------------------------------------------------
# the objective DDP wraps


class Objective(nn.Module):
    """Summed NLL (nats) of a batch: the module DDP wraps, so every parameter is used in forward."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.token_nll(self.model(inputs), targets).sum()


def build_model(recipe: Recipe, vocab_size: int) -> TransformerLM:
    """The model of a recipe, initialised from train.seed (identically on every process)."""
    torch.manual_seed(recipe.train.seed)
    return TransformerLM(recipe.model, vocab_size, recipe.context_length)


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, recipe: Recipe, layout: Layout, data: TaskData):
        self.recipe, self.layout, self.data = recipe, layout, data
        t = recipe.train
        self.save_dir = Path(t.save_dir)
        self.model = build_model(recipe, data.vocab_size).to(layout.device)
        self.optimizer = build_optimizer(self.model, recipe.optim)
        self.scaler = torch.amp.GradScaler(
            layout.device.type, init_scale=t.loss_scale_init, enabled=t.precision == "fp16"
        )
        objective = Objective(self.model)
        if layout.world_size > 1:
            ids = [layout.device.index] if layout.device.type == "cuda" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        self.objective = torch.compile(objective) if t.compile else objective
        self.sampler = EpochSampler(
            data.n_train, t.batch_size, t.seed, layout.rank, layout.world_size
        )
        self.micro = t.micro_batch_size or t.batch_size // layout.world_size
        if (t.batch_size // layout.world_size) % self.micro:
            raise UserError(
                f"train.micro_batch_size={self.micro} does not divide the "
                f"{t.batch_size // layout.world_size} sequences per process of each update"
            )
        self.total_updates = t.max_updates or t.max_epochs * len(self.sampler)
        self.updates, self.skipped, self.overflows_in_a_row = 0, 0, 0
        self.best_valid, self.bad_validations = math.inf, 0
        self.out_of_patience = False
        self.stop_signal = None

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (one process gathers the RNG of all)."""
        rng = {"torch": torch.get_rng_state()}
        if self.layout.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.layout.device)
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * self.layout.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "sampler": self.sampler.state_dict(),
            "counters": {
                "updates": self.updates,
                "skipped": self.skipped,
                "best_valid": self.best_valid,
                "bad_validations": self.bad_validations,
            },
            "vocab_size": self.data.vocab_size,
            "world_size": self.layout.world_size,
            "recipe": self.recipe.to_dict(),
            "versions": {"sbtrain": __version__, "torch": str(torch.__version__)},
        }

    def load_state_dict(self, state: dict, reset_optimizer: bool, reset_dataloader: bool) -> None:
        self.model.load_state_dict(state["model"])
        if not reset_optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            counters = state["counters"]
            self.updates, self.skipped = counters["updates"], counters["skipped"]
            self.best_valid, self.bad_validations = (
                counters["best_valid"],
                counters["bad_validations"],
            )
        if not reset_dataloader:
            self.sampler.load_state_dict(state["sampler"])
        if (
            not (reset_optimizer or reset_dataloader)
            and len(state["rng"]) == self.layout.world_size
        ):
            rng = state["rng"][self.layout.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.layout.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.layout.device)

    def save(self, end_of_epoch: int | None = None, is_best: bool = False) -> None:
        """checkpoint_last.pt, plus the numbered and best names where due (main process writes)."""
        state = self.state_dict()  # a collective under DDP: every process takes part
        if not self.layout.is_main:
            return
        last = self.save_dir / "checkpoint_last.pt"
        also = []
        t = self.recipe.train
        if end_of_epoch is not None or (t.save_interval and self.updates % t.save_interval == 0):
            epoch = end_of_epoch if end_of_epoch is not None else self.sampler.epoch
            also.append(self.save_dir / f"checkpoint_{epoch}_{self.updates}.pt")
        if is_best:
            also.append(self.save_dir / "checkpoint_best.pt")
        checkpoint.save(state, last, also)
        checkpoint.prune(self.save_dir, t.keep_last)

    # -- one update -------------------------------------------------------------------------

    def train_step(self, indices: list[int], dataset) -> dict | None:
        """One update from this process's share of a global batch; None if fp16 skipped it."""
        t, device = self.recipe.train, self.layout.device
        micro = [
            collate([dataset[i] for i in indices[s : s + self.micro]])
            for s in range(0, len(indices), self.micro)
        ]
        local_tokens = sum(int((y != IGNORE).sum()) for _, y in micro)
        global_tokens, sequences = distributed.all_reduce_sum([local_tokens, len(indices)], device)
        lr = lr_at(self.updates + 1, self.recipe.optim, self.total_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        nll_total = 0.0
        for j, (x, y) in enumerate(micro):
            last = j == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.layout.world_size == 1
                else self.objective.no_sync()
            )
            with sync:
                with autocast(device, t.precision):
                    nll = self.objective(x.to(device), y.to(device))
                # DDP averages gradients over processes: scale so they sum to the global mean
                loss = nll * (self.layout.world_size / max(global_tokens, 1))
                self.scaler.scale(loss).backward()
            nll_total += nll.item()
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe.optim.clip_norm
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        nll_total = distributed.all_reduce_sum([nll_total], device)[0]
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            return None  # overflow: the optimizer step was skipped
        self.updates += 1
        gnorm = float(gnorm)
        return {
            "nll": nll_total,
            "tokens": int(global_tokens),
            "sequences": int(sequences),
            "gnorm": gnorm,
            "clipped": 0 < clip < gnorm,
            "lr": lr,
        }

    # -- validation -------------------------------------------------------------------------

    def validate(self) -> Score | None:
        """Loss over the validation set, split over processes and summed."""
        if self.data.valid is None:
            return None
        t = self.recipe.train
        n = len(self.data.valid)
        if t.max_valid_batches:
            n = min(n, t.max_valid_batches * self.micro * self.layout.world_size)
        mine = list(range(self.layout.rank, n, self.layout.world_size))
        s = score(
            self.model,
            self.data.valid,
            mine,
            self.micro,
            self.layout.device,
            t.precision,
            count_correct=self.recipe.task == "copy",
        )
        s.nll, tokens, correct = distributed.all_reduce_sum(
            [s.nll, s.tokens, s.correct], self.layout.device
        )
        s.tokens, s.correct = int(tokens), int(correct)
        return s

    def validate_and_save(
        self, logger: Logger | None, epoch: int, end_of_epoch: bool = False
    ) -> bool:
        """Validate during `epoch`, save (numbered at an epoch's end, best if improved); True
        if patience ran out."""
        s = self.validate()
        is_best = False
        if s is not None:
            is_best = s.loss_nats < self.best_valid
            if is_best:
                self.best_valid, self.bad_validations = s.loss_nats, 0
            else:
                self.bad_validations += 1
            if logger is not None:
                record = {
                    "update": self.updates,
                    "epoch": epoch,
                    "loss": s.loss_bits,
                    "nll_nats": s.loss_nats,
                    "ppl": s.ppl,
                    "tokens": s.tokens,
                    "best_loss": self.best_valid / math.log(2),
                }
                if self.recipe.task == "copy":
                    record["accuracy"] = s.accuracy
                logger.log(record, prefix="valid")
        self.save(epoch if end_of_epoch else None, is_best)
        patience = self.recipe.train.patience
        return patience is not None and self.bad_validations >= patience

    # -- the loop ---------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        flag = self.stop_signal is not None
        if self.layout.world_size > 1:
            flag = distributed.any_process(flag, self.layout.device)
        return flag

    def finished(self) -> bool:
        t = self.recipe.train
        return (
            self.updates >= self.total_updates
            or self.sampler.epoch > t.max_epochs
            or self.out_of_patience
        )

    def run(self, logger: Logger | None) -> dict:
        """Train until max_updates / max_epochs / patience; returns a summary."""
        t = self.recipe.train
        interval = Interval()
        while not self.finished():
            dataset = self.data.train_set(self.sampler.epoch)
            for indices in self.sampler.epoch_batches():
                if not self._update(indices, dataset, interval, logger):
                    continue  # fp16 overflow: no update happened
                if self.finished():
                    break
                if self.sampler.batches_done >= len(self.sampler):
                    break  # the epoch-end validation follows
                if t.validate_interval and self.updates % t.validate_interval == 0:
                    self.out_of_patience = self.validate_and_save(logger, self.sampler.epoch)
                    if self.out_of_patience:
                        break
                elif t.save_interval and self.updates % t.save_interval == 0:
                    self.save()
            epoch = self.sampler.epoch
            end_of_epoch = self.sampler.batches_done >= len(self.sampler)
            if end_of_epoch:
                self.sampler.next_epoch()
            if not self.out_of_patience:
                self.out_of_patience = self.validate_and_save(logger, epoch, end_of_epoch)
        return {
            "updates": self.updates,
            "best_valid_nats": self.best_valid,
            "skipped": self.skipped,
        }

    def _update(
        self, indices: list[int], dataset, interval: Interval, logger: Logger | None
    ) -> bool:
        """One training step with its bookkeeping; True if the parameters were updated."""
        stats = self.train_step(indices, dataset)
        if stats is None:
            self._count_overflow(logger)
        else:
            self.overflows_in_a_row = 0
            interval.add(
                stats["nll"], stats["tokens"], stats["sequences"], stats["gnorm"], stats["clipped"]
            )
            if logger is not None and self.updates % self.recipe.train.log_interval == 0:
                logger.log(self._record(interval, stats["lr"]))
                interval.reset()
        if self._should_stop():
            self.save()
            signum = self.stop_signal or signal.SIGTERM
            raise Stopped(
                signum,
                f"stopped by {signal.Signals(signum).name} after update {self.updates}: saved "
                f"{self.save_dir / 'checkpoint_last.pt'}; rerun the same command to resume",
            )
        return stats is not None

    def _count_overflow(self, logger: Logger | None) -> None:
        self.skipped += 1
        self.overflows_in_a_row += 1
        if logger is not None:
            logger.log(
                {
                    "update": self.updates,
                    "skipped": self.skipped,
                    "loss_scale": self.scaler.get_scale(),
                },
                prefix="overflow",
            )
        if self.overflows_in_a_row >= MAX_OVERFLOWS:
            raise UserError(
                f"fp16: {MAX_OVERFLOWS} gradient overflows in a row (loss scale now "
                f"{self.scaler.get_scale():g}); the model diverged or fp16 cannot hold it: lower "
                "optim.lr, raise optim.warmup_updates, or use train.precision=bf16"
            )

    def _record(self, interval: Interval, lr: float) -> dict:
        record = {
            "update": self.updates,
            "epoch": self.sampler.epoch,
            **interval.summary(),
            "lr": lr,
        }
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
            record["skipped"] = self.skipped
        mem = peak_memory_gb(self.layout.device)
        if mem is not None:
            record["mem_gb"] = mem
        return record


# ---------------------------------------------------------------------------------------------
# entry point


def check_compatible(state: dict, recipe: Recipe, vocab_size: int, path: Path) -> None:
    """Refuse to load weights of another architecture, naming the first difference."""
    old = state["recipe"]["model"]
    new = recipe.to_dict()["model"]
    for key in (
        "n_layers",
        "n_heads",
        "d_model",
        "d_ff",
        "positions",
        "output",
        "adaptive_cutoffs",
        "attention",
    ):
        if old.get(key) != new.get(key):
            raise UserError(
                f"{path} holds a model with model.{key}={old.get(key)}, the recipe has "
                f"{new.get(key)}: use another train.save_dir, or a matching --restore-file"
            )
    if state["vocab_size"] != vocab_size or state["recipe"].get("task") != recipe.task:
        raise UserError(
            f"{path} was trained on {state['recipe'].get('task')} with a vocabulary of "
            f"{state['vocab_size']}, this is {recipe.task} with {vocab_size}: "
            "use another train.save_dir"
        )


def prepare_save_dir(save_dir: Path) -> None:
    """Create train.save_dir and prove it writable, before any training happens."""
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f"{checkpoint.TEMP_PREFIX}probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"train.save_dir={save_dir}: cannot write there ({e.strerror or type(e).__name__}); "
            "choose a writable folder"
        ) from None


def main(
    recipe: Recipe,
    restore_file: str | None = None,
    reset_optimizer: bool = False,
    reset_dataloader: bool = False,
) -> dict:
    """Train `recipe`, resuming from save_dir/checkpoint_last.pt (or `restore_file`) if present."""
    layout = distributed.setup(recipe.train.device)
    try:
        return _train(recipe, layout, restore_file, reset_optimizer, reset_dataloader)
    finally:
        distributed.teardown()


def _train(recipe, layout, restore_file, reset_optimizer, reset_dataloader) -> dict:
    data = TaskData(recipe)
    save_dir = Path(recipe.train.save_dir)
    restore = Path(restore_file) if restore_file else save_dir / "checkpoint_last.pt"
    state = None
    if restore.is_file():
        state = checkpoint.load(restore)
        check_compatible(state, recipe, data.vocab_size, restore)
    elif restore_file:
        raise UserError(f"--restore-file {restore_file}: checkpoint not found")
    if layout.is_main:
        prepare_save_dir(save_dir)
        (save_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    trainer = Trainer(recipe, layout, data)
    if state is not None:
        trainer.load_state_dict(state, reset_optimizer, reset_dataloader)
    logger = None
    if layout.is_main:
        print(recipe.to_yaml(), end="")
        n_params = count_parameters(trainer.model)
        where = f"resuming from {restore} at update {trainer.updates}" if state else "starting"
        print(
            f"| model: {n_params:,} parameters | {layout.world_size} process(es) on "
            f"{layout.device} | {where}",
            flush=True,
        )
        logger = Logger(save_dir, recipe.train.tensorboard, trainer.total_updates, trainer.updates)
    handlers = {s: signal.signal(s, trainer._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = trainer.run(logger)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if logger is not None:
            logger.close()
    if layout.is_main:
        print(
            f"| done: {summary['updates']} updates, best valid loss "
            f"{summary['best_valid_nats'] / math.log(2):.4f} bits",
            file=sys.stdout,
            flush=True,
        )
    return summary
