"""`sbtrain bench train --processes N [--parallel fsdp] [--context-parallel 1,2]`: real training
steps on N processes (torchrun, gloo on CPU), per process: peak RSS, the memory of the model and
optimizer it holds (parameters, gradients, AdamW moments: its shards under fsdp) and what the
step adds on top of what the process holds before it (activations and temporaries: with a
warmup step, under an allocator that returns freed memory: SBTRAIN_ALLOCATOR=glibc), its
activations (counted by PyTorch's memory tracker over the first step: `activation_mib`), the step
time and tokens/s, and the bytes it sends per step in context-parallel exchanges (counted at the
collectives). Each case runs in its own torchrun; the other processes' rows are gathered into
rank 0's.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from sbtrain import bench, distributed
from sbtrain.attention.context_parallel import traffic
from sbtrain.errors import UserError
from sbtrain.tasks import load_recipe
from sbtrain.trainer import Trainer

MARK = "sbtrain-bench-parallel "  # the line of results a worker's rank 0 prints


def state_mib(trainer) -> float:
    """MiB of this process's parameters, gradients and optimizer states (local shards)."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(2 * local(p) for p in trainer.model.parameters())  # the parameter, its gradient
    for state in trainer.optimizer.state.values():
        total += sum(local(v) for v in state.values() if torch.is_tensor(v) and v.dim())
    return total / 2**20


def activation_mib(step, trainer) -> float | None:
    """Run `step` under PyTorch's memory tracker (torch.distributed._tools.mem_tracker, private:
    None where this torch lacks it) and return the most memory its forward passes (activation
    checkpointing's recomputation included) held at once: the largest activation total at any
    module's peak in forward or backward. Parameters, gradients, optimizer states and backward's
    temporaries (DDP's gradient buckets among them) are not counted; the allocator plays no part."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState
    except ImportError:
        step()
        return None
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with tracker:
        step()
    peaks = [
        by_kind.get(_MemRefType.ACT, 0)
        for stats in tracker.memory_tracking.values()
        for state in (_ModState.PEAK_FW, _ModState.PEAK_BW)
        for snapshot in stats.snapshots.get(state, [])
        for by_kind in snapshot.values()
    ]
    return max(peaks, default=0) / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's record of this process's peak resident memory (Linux 4.0 on), so a
    peak read later is the timed steps' own, not the warmup's; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident memory since the start or the last reset_peak_rss."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: dict) -> None:
    """One case, inside torchrun: build the trainer, run the steps, print rank 0's gather."""
    recipe = load_recipe(case["recipe"], case["overrides"])
    t = recipe.train
    layout = distributed.setup(t.device, t.context_parallel, group_needed=t.parallel == "fsdp")
    steps, warmup = case["steps"], case["warmup"]
    data = bench.synthetic_data(recipe, case["vocab_size"], t.batch_size * (steps + warmup))
    trainer = Trainer(recipe, layout, data)
    batches, dataset = trainer.sampler.epoch_batches(), data.train_set(1)
    tracked = []  # the first step's activations: the warmup's, or (without one) a timed step's

    def step():
        indices = next(batches)
        if tracked:
            trainer.train_step(indices, dataset)
        else:
            tracked.append(activation_mib(lambda: trainer.train_step(indices, dataset), trainer))

    for _ in range(warmup):
        step()
    # after a warmup step the process holds gradients and AdamW moments: the peak of the timed
    # steps above what it holds before them is what a step adds (activations, temporaries)
    since_warmup = warmup > 0 and reset_peak_rss()
    base, shard = bench.rss_mib(), trainer.model.shard
    sent_before = shard.sent[0] if shard else 0
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = peak_rss_mib()
    row = {
        "rank": layout.rank,
        "step_s": seconds,
        "tokens_per_s": t.batch_size * trainer.task.context_length / seconds,
        "peak_rss_mib": peak,
        "state_mib": state_mib(trainer),
        "rss_before_steps_mib": base,
        "activation_mib": tracked[0],
        "peak_since_warmup": since_warmup,
        "sent_bytes_per_step": ((shard.sent[0] - sent_before) / steps) if shard else 0,
    }
    rows = [None] * layout.world_size
    dist.all_gather_object(rows, row) if dist.is_initialized() else rows.__setitem__(0, row)
    if layout.is_main:
        print(MARK + json.dumps(rows), flush=True)


def run_case(case: dict, processes: int) -> list[dict]:
    """Every process's row of one case, run under torchrun (one thread per process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "sbtrain.bench.parallel",
               json.dumps(case)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or not lines:
        said = [line.split("UserError: ", 1)[1] for line in result.stderr.splitlines()
                if "UserError: " in line]  # fmt: skip
        why = said[0] if said else " ".join(result.stderr.strip().splitlines()[-3:])[:300]
        raise UserError(f"bench train on {processes} processes failed: {why}")
    return json.loads(lines[-1][len(MARK) :])


def rows(
    paths: list[str], overrides: list[str], lengths: list[int | None], processes: int,
    parallel: str, context_parallel: list[int], steps: int, warmup: int, vocab_size: int,
) -> list[dict]:  # fmt: skip
    """One row per recipe, length and context-parallel size: the mean over processes of the
    step, the largest peak RSS, state and extra memory of one process, bytes sent per process."""
    out = []
    for path in paths:
        for length in lengths:
            for parts in context_parallel:
                extra = [f"train.parallel={parallel}", f"train.context_parallel={parts}"]
                if length is not None:
                    extra.append(f"data.tokens_per_sample={length}")
                recipe = load_recipe(path, [*overrides, *extra])  # checked before any run
                case = {"recipe": path, "overrides": [*overrides, *extra], "steps": steps,
                        "warmup": warmup, "vocab_size": vocab_size}  # fmt: skip
                per_process = run_case(case, max(processes, parts))
                out.append(summary(path, recipe, parts, per_process))
    return out


def summary(path: str, recipe, parts: int, per_process: list[dict]) -> dict:
    a = recipe.model.attention
    length = recipe.data.tokens_per_sample
    heads, head_dim = recipe.model.n_heads, recipe.model.head_dim
    counted = [r["activation_mib"] for r in per_process]
    groups = max(len(per_process) // parts, 1)  # data-parallel groups share the batch
    formula = recipe.model.n_layers * traffic(
        a.kind, recipe.train.batch_size // groups, heads, head_dim, length, parts, a.window or 0,
        a.n_features or 0, forwards=1 + recipe.train.activation_checkpointing,
    ) if parts > 1 else 0  # fmt: skip
    return {
        "recipe": path,
        "attention": a.kind,
        "parallel": recipe.train.parallel,
        "processes": len(per_process),
        "context_parallel": parts,
        "length": length,
        "step_s": sum(r["step_s"] for r in per_process) / len(per_process),
        "tokens_per_s": per_process[0]["tokens_per_s"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in per_process),
        "state_mib": max(r["state_mib"] for r in per_process),
        "step_extra_mib": max(r["peak_rss_mib"] - r["rss_before_steps_mib"] for r in per_process),
        "activation_mib": None if None in counted else max(counted),
        "activation_mib_per_process": counted,
        "peak_since_warmup": all(r["peak_since_warmup"] for r in per_process),
        "sent_bytes_per_step": max(r["sent_bytes_per_step"] for r in per_process),
        "sent_bytes_formula": formula,
    }


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))  # its trainer freed here, before the group (teardown)
    distributed.synchronize()  # no process leaves the group while another still uses it
    distributed.teardown()
