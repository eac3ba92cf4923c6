"""`sbtrain train`: the training loop, resumable exactly, on one process or DDP.

    sbtrain.trainer.main(load_recipe("recipes/debug.yaml", ["train.max_updates=20"]))

Rerunning with the same `train.save_dir` resumes from `checkpoint_last.pt`: same data order,
dropout and losses as a run that was never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
from torch import nn

from sbtrain import __version__, checkpoint, distributed, sharded
from sbtrain.attention import dispatch
from sbtrain.batch import IGNORE, chunk
from sbtrain.config import Recipe
from sbtrain.datasets import EpochSampler
from sbtrain.distributed import Layout
from sbtrain.errors import UserError
from sbtrain.metrics import Interval, Logger, peak_memory_gb
from sbtrain.model import Block, count_parameters
from sbtrain.optim import build_optimizer, lr_at
from sbtrain.scoring import Validator, autocast
from sbtrain.staging import write_file
from sbtrain.tasks import TrainingData, build_model, get_task

MAX_OVERFLOWS = 25  # consecutive fp16 overflows before we give up


class Stopped(Exception):
    """Training stopped by a signal after saving checkpoint_last.pt."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# the objective DDP wraps


class Objective(nn.Module):
    """Summed NLL (nats) of a batch: the module DDP wraps, so the loss is computed in forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        *inputs, targets = batch
        return self.model.token_nll(self.model(*inputs), targets).sum()


class Overflows:
    """fp16 steps the loss scaler skipped (a gradient overflowed): counted, logged, and fatal
    after MAX_OVERFLOWS in a row."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler, self.skipped, self.in_a_row = scaler, 0, 0

    def skipped_one(self, logger: Logger | None, update: int) -> None:
        self.skipped += 1
        self.in_a_row += 1
        scale = self.scaler.get_scale()
        if logger is not None:
            record = {"update": update, "skipped": self.skipped, "loss_scale": scale}
            logger.log(record, prefix="overflow")
        if self.in_a_row >= MAX_OVERFLOWS:
            raise UserError(
                f"fp16: {MAX_OVERFLOWS} gradient overflows in a row (loss scale now {scale:g}); "
                "the model diverged or fp16 cannot hold it: lower optim.lr, raise "
                "optim.warmup_updates, or use train.precision=bf16"
            )


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, recipe: Recipe, layout: Layout, data: TrainingData):
        self.recipe, self.layout, self.data = recipe, layout, data
        self.task = get_task(recipe)
        t = recipe.train
        self.save_dir = Path(t.save_dir)
        dispatch.check_device(t.attention_impl, layout.device)
        model = build_model(recipe, **data.model_args)
        self.model = model.to(layout.device)
        self.model.shard = layout.shard()  # context parallelism: this process's chunk
        blocks = [m for m in self.model.modules() if isinstance(m, Block)]
        objective = distributed.parallelize(
            Objective(self.model), layout, t.parallel, t.precision, blocks
        )
        self.optimizer = build_optimizer(self.model, recipe.optim)  # sharded parameters, if so
        self.scaler = torch.amp.GradScaler(
            layout.device.type, init_scale=t.loss_scale_init, enabled=t.precision == "fp16"
        )
        self.objective = torch.compile(objective) if t.compile else objective
        self.sampler = EpochSampler(
            data.n_train, t.batch_size, t.seed, layout.dp_rank, layout.dp_size
        )
        self.micro = micro_batch_size(recipe, layout.dp_size)
        self.total_updates = t.max_updates or t.max_epochs * len(self.sampler)
        self.updates = 0
        self.overflows = Overflows(self.scaler)
        self.validator = Validator(
            self.task, data.valid, self.micro, layout, t.precision, t.max_valid_batches
        )
        self.interval = Interval()
        self.same_best_metric = True  # whether a resumed checkpoint's best followed this metric
        self.validated_at = -1
        self.stop_signal = None

    # -- state ------------------------------------------------------------------------------

    def state_dict(self, tensors: bool = True) -> dict:
        """Everything needed to continue exactly (one process gathers the RNG of all); without
        the model and optimizer `tensors` when those are saved sharded."""
        weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            **(weights if tensors else {}),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_states(self.layout),
            "sampler": self.sampler.state_dict(),
            "meters": self.interval.state_dict(),
            "counters": {
                "updates": self.updates,
                "skipped": self.overflows.skipped,
                **self.validator.state_dict(),
            },
            "vocab_size": self.data.vocab_size,
            "model_args": self.data.model_args,
            "world_size": self.layout.world_size,
            "recipe": self.recipe.to_dict(),
            "versions": {"sbtrain": __version__, "torch": str(torch.__version__)},
        }

    def load_state_dict(self, state: dict, reset_optimizer: bool, reset_dataloader: bool) -> None:
        """Continue from `state`; the reset flags start optimizer/counters or data order anew."""
        if "sharded" in state:  # shards re-cut for this run's processes
            optimizer = None if reset_optimizer else self.optimizer
            sharded.load(Path(state["sharded"]), self.model, optimizer)
        elif self.recipe.train.parallel == "fsdp":  # one file, cut into this run's shards
            sharded.load_whole(state, self.model, None if reset_optimizer else self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            if not reset_optimizer:
                self.optimizer.load_state_dict(state["optimizer"])
        if not reset_optimizer:
            self.scaler.load_state_dict(state["scaler"])
            counters = state["counters"]
            self.updates, self.overflows.skipped = counters["updates"], counters["skipped"]
            self.same_best_metric = self.validator.load_state_dict(counters)
            self.interval.load_state_dict(state["meters"])
        if not reset_dataloader:
            self.sampler.load_state_dict(state["sampler"])
        if not (reset_optimizer or reset_dataloader):
            checkpoint.restore_rng(state["rng"], self.layout)

    def save(self, end_of_epoch: int | None = None, is_best: bool = False) -> None:
        """checkpoint_last.pt, plus the numbered and best names where due (the main process
        writes, or every process its shards under fsdp)."""
        t = self.recipe.train
        names = ["checkpoint_last.pt"]
        if end_of_epoch is not None or (t.save_interval and self.updates % t.save_interval == 0):
            epoch = end_of_epoch if end_of_epoch is not None else self.sampler.epoch
            names.append(f"checkpoint_{epoch}_{self.updates}.pt")
        if is_best:
            names.append("checkpoint_best.pt")
        fsdp = t.parallel == "fsdp"
        state = self.state_dict(tensors=not fsdp)  # a collective: every process takes part
        shards = (self.model, self.optimizer) if fsdp else None
        checkpoint.save_training(
            state, self.save_dir, names, t.keep_last, self.layout.is_main, shards
        )

    # -- one update -------------------------------------------------------------------------

    def train_step(self, indices: list[int], dataset) -> dict | None:
        """One update from this process's share of a global batch; None if fp16 skipped it."""
        t, device = self.recipe.train, self.layout.device
        batches = [
            chunk(self.task.collate([dataset[i] for i in indices[s : s + self.micro]]),
                  self.model.shard, self.task.context_length)
            for s in range(0, len(indices), self.micro)
        ]  # fmt: skip
        local_tokens = sum(int((batch[-1] != IGNORE).sum()) for batch in batches)
        global_tokens, sequences = distributed.all_reduce_sum([local_tokens, len(indices)], device)
        sequences /= self.layout.context_parallel  # each process of a group holds every sequence
        lr = lr_at(self.updates + 1, self.recipe.optim, self.total_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        nll_total = 0.0
        for j, batch in enumerate(batches):
            with distributed.gradient_sync(self.objective, sync=j == len(batches) - 1):
                with autocast(device, t.precision):
                    nll = self.objective(*(t.to(device) for t in batch))
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
        if t.redraw_interval and self.updates % t.redraw_interval == 0:
            redraw_attention(self.model, t.seed, self.updates)
        gnorm = distributed.as_float(gnorm)
        return {
            "nll": nll_total,
            "tokens": int(global_tokens),
            "sequences": int(sequences),
            "gnorm": gnorm,
            "clipped": 0 < clip < gnorm,
            "lr": lr,
        }

    # -- validation -------------------------------------------------------------------------

    def validate_and_save(
        self, logger: Logger | None, epoch: int, end_of_epoch: bool = False
    ) -> None:
        """Validate during `epoch`, then save (numbered at an epoch's end, best if improved)."""
        self.validated_at = self.updates
        s, is_best = self.validator.validate(self.model)
        if s is not None and logger is not None:
            record = {"update": self.updates, "epoch": epoch, **self.validator.record(s)}
            logger.log(record, prefix="valid")
        self.save(epoch if end_of_epoch else None, is_best)

    # -- the loop ---------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _stop_if_asked(self) -> None:
        """After a signal: save checkpoint_last.pt and raise Stopped (on every process)."""
        flag = self.stop_signal is not None
        if self.layout.world_size > 1:
            flag = distributed.any_process(flag, self.layout.device)
        if not flag:
            return
        self.save()
        signum = self.stop_signal or signal.SIGTERM
        raise Stopped(
            signum,
            f"stopped by {signal.Signals(signum).name} after update {self.updates}: saved "
            f"{self.save_dir / 'checkpoint_last.pt'}; rerun the same command to resume",
        )

    def finished(self) -> bool:
        t = self.recipe.train
        return (
            self.updates >= self.total_updates
            or self.sampler.epoch > t.max_epochs
            or self.validator.out_of_patience(t.patience)
        )

    def run(self, logger: Logger | None) -> dict:
        """Train until max_updates / max_epochs / patience; returns a summary.

        A signal takes effect after the update in progress and the validation or checkpoint
        due at it, so a resumed run misses nothing.
        """
        t = self.recipe.train
        while not self.finished():
            dataset = self.data.train_set(self.sampler.epoch)
            for indices in self.sampler.epoch_batches():
                updated = self._update(indices, dataset, logger)
                if self.finished() or self.sampler.batches_done >= len(self.sampler):
                    break  # the final or epoch-end validation follows
                if updated and t.validate_interval and self.updates % t.validate_interval == 0:
                    self.validate_and_save(logger, self.sampler.epoch)
                    if self.finished():
                        break
                elif updated and t.save_interval and self.updates % t.save_interval == 0:
                    self.save()
                self._stop_if_asked()
            epoch = self.sampler.epoch
            end_of_epoch = self.sampler.batches_done >= len(self.sampler)
            if end_of_epoch:
                self.sampler.next_epoch()
            if self.validated_at != self.updates:  # not just done by the interval
                self.validate_and_save(logger, epoch, end_of_epoch)
            self._stop_if_asked()
        return {
            "updates": self.updates,
            "best_valid": self.validator.best,
            "best_metric": self.validator.metric,
            "skipped": self.overflows.skipped,
        }

    def _update(self, indices: list[int], dataset, logger: Logger | None) -> bool:
        """One training step and its log line; True if the parameters were updated."""
        stats = self.train_step(indices, dataset)
        if stats is None:
            self.overflows.skipped_one(logger, self.updates)
            return False
        self.overflows.in_a_row = 0
        self.interval.add(
            stats["nll"], stats["tokens"], stats["sequences"], stats["gnorm"], stats["clipped"]
        )
        if self.updates % self.recipe.train.log_interval == 0:
            if logger is not None:
                logger.log(self._record(stats["lr"]))
            self.interval.reset()
        return True

    def _record(self, lr: float) -> dict:
        record = {
            "update": self.updates,
            "epoch": self.sampler.epoch,
            **self.interval.summary(self.task.unit),
            "lr": lr,
        }
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
            record["skipped"] = self.overflows.skipped
        mem = peak_memory_gb(self.layout.device)
        if mem is not None:
            record["mem_gb"] = mem
        return record


# ---------------------------------------------------------------------------------------------
# entry point


@torch.no_grad()
def redraw_attention(model: nn.Module, seed: int, update: int) -> None:
    """New random projections for every attention kernel that has them (`redraw`), layer by
    layer from seeds that depend only on (train.seed, update): the same on every process and on
    a rerun; the draw lives in the kernels' buffers, so checkpoints carry it."""
    seeds = torch.Generator().manual_seed(seed * 1_000_003 + update)
    for module in model.modules():
        redraw = getattr(module, "redraw", None)
        if callable(redraw) and module is not model:
            redraw(int(torch.randint(0, 2**62, (), generator=seeds, dtype=torch.int64)))


def micro_batch_size(recipe: Recipe, groups: int) -> int:
    """Sequences per forward pass per process when `groups` share each batch (the processes, or
    the context-parallel groups); a UserError if the batch cannot be split."""
    t = recipe.train
    if t.batch_size % groups:
        over = (f"{groups} data-parallel groups (processes / train.context_parallel)"
                if t.context_parallel > 1 else f"{groups} processes")  # fmt: skip
        raise UserError(
            f"train.batch_size={t.batch_size} cannot be split over {over}; "
            "make it a multiple of that number"
        )
    share = t.batch_size // groups
    micro = t.micro_batch_size or share
    if share % micro:
        raise UserError(
            f"train.micro_batch_size={micro} does not divide the {share} sequences per "
            "process of each update"
        )
    return micro


def main(
    recipe: Recipe,
    restore_file: str | None = None,
    reset_optimizer: bool = False,
    reset_dataloader: bool = False,
) -> dict:
    """Train `recipe`. Resumes from save_dir/checkpoint_last.pt when it exists; otherwise
    starts from `restore_file` (with the reset flags) if given, or from scratch."""
    t = recipe.train
    groups = int(os.environ.get("WORLD_SIZE", "1")) // t.context_parallel
    micro_batch_size(recipe, max(groups, 1))  # before joining a group
    layout = distributed.setup(t.device, t.context_parallel, group_needed=t.parallel == "fsdp")
    try:
        result = _train(recipe, layout, restore_file, reset_optimizer, reset_dataloader)
        distributed.synchronize()  # no process leaves the group while another still uses it
        return result
    finally:
        distributed.teardown()


def _train(recipe, layout, restore_file, reset_optimizer, reset_dataloader) -> dict:
    data = get_task(recipe).training_data()
    path, state, resuming = checkpoint.resume_point(recipe.train.save_dir, restore_file)
    trainer = Trainer(recipe, layout, data)  # every check before anything is written
    if state is not None:
        checkpoint.check_compatible(state, recipe, trainer.model, path)
        if resuming:  # a rerun continues where it stopped: the reset flags were for its start
            reset_optimizer = reset_dataloader = False
        trainer.load_state_dict(state, reset_optimizer, reset_dataloader)
    save_dir = Path(recipe.train.save_dir)
    logger = None
    if layout.is_main:
        checkpoint.prepare_save_dir(save_dir)
        write_file(save_dir / "recipe.yaml", lambda f: f.write(recipe.to_yaml().encode()))
        print(recipe.to_yaml(), end="")
        n_params = count_parameters(trainer.model)
        where = f"resuming from {path} at update {trainer.updates}" if state else "starting"
        print(
            f"| model: {n_params:,} parameters | {layout.world_size} process(es) on "
            f"{layout.device} | {where}",
            flush=True,
        )
        metric = trainer.validator.metric
        note = "" if trainer.same_best_metric else " (the checkpoint followed another: anew)"
        print(f"| checkpoint_best.pt and patience follow the valid {metric}{note}", flush=True)
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
            f"| done: {summary['updates']} updates, {trainer.validator.best_text()}",
            flush=True,
        )
    return summary
