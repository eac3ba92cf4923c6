"""Process layout: one process, or DDP under torchrun (NCCL on GPU, gloo on CPU); the device."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sbtrain.attention.context_parallel import Shard
from sbtrain.errors import UserError


@dataclass(frozen=True)
class Layout:
    """Where this process sits: `rank` of `world_size`, its device, and the context-parallel
    group of `context_parallel` consecutive ranks sharing each sequence (chunk `cp_rank` each);
    the groups split the batch between them (data parallelism: `dp_rank` of `dp_size`)."""

    rank: int
    world_size: int
    device: torch.device
    context_parallel: int = 1
    cp_group: object = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def cp_rank(self) -> int:
        return self.rank % self.context_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def dp_size(self) -> int:
        return self.world_size // self.context_parallel

    def shard(self) -> Shard | None:
        """The chunk of every sequence this process computes (None: whole sequences)."""
        if self.context_parallel == 1:
            return None
        return Shard(self.cp_rank, self.context_parallel, self.cp_group)


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def mallopt(**settings: int) -> None:
    """Set glibc malloc parameters by name (`M_MMAP_THRESHOLD=...`); elsewhere do nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for name, value in settings.items():
        libc.mallopt(globals()[name], value)


def keep_freed_cpu_memory(mmap_threshold: int = 4 * 2**20) -> None:
    """Let glibc keep freed blocks under `mmap_threshold` bytes for the next step; map larger ones.

    By default glibc maps every block over its mmap threshold (at most 32 MiB) afresh and unmaps
    it when freed, so each pass page-faults its large tensors in again: local, performer and
    scatterbrain forward+backward at length 16384 took 1.9-2.7x as long as with every block kept
    (the attention benchmark still keeps them all: `mmap_threshold=2**30`). But keeping every
    block lets the heap fragment: a step of the wt103 model (8 layers, scatterbrain, activation
    checkpointing, L=4096) held 1.0-1.9 GiB free in the heap and reached a peak RSS of 6.2 GiB,
    growing with every block, and at L=32768 it outgrew 22 GiB. Blocks of 4 MiB and more are
    therefore mapped afresh (peak 4.3 GiB, about 0.5 GiB over the live memory; the 16-layer model
    trains at L=32768 in 5.0 GiB), and smaller ones kept (the heap is not trimmed below 1 GiB of
    free top). A threshold over the (tokens x d_model) size does not help: at 64 MiB, blocks up
    to that size fragmented the heap of an L=16384 step as before (8 layers: 4 GiB
    free in it, peak RSS 8.0 GiB for 3.5 GiB in use). The price is the page faults again: a
    checkpointed attention sublayer took 1.6-2x as long, a feed-forward one 1.2-1.3x, about a
    fifth of a wt103 step at 2k and at 16k.
    Elsewhere (no glibc) this does nothing.
    """
    mallopt(M_MMAP_THRESHOLD=mmap_threshold, M_TRIM_THRESHOLD=2**30)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is cuda (this process's GPU) when available, else cpu (see keep_freed_cpu_memory)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device {name!r} asked for, but torch sees no CUDA GPU; use device=cpu"
            )
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    keep_freed_cpu_memory()
    return torch.device("cpu")


def setup(device_name: str, context_parallel: int = 1, group_needed: bool = False) -> Layout:
    """Join the process group when started by torchrun (WORLD_SIZE > 1, or always with
    `group_needed`: FSDP shards over a group even of one), and make the context-parallel groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % context_parallel:
        raise UserError(
            f"train.context_parallel={context_parallel} does not divide the {world_size} "
            "processes; start a multiple of it"
        )
    if world_size == 1 and not group_needed:
        return Layout(0, 1, pick_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world_size == 1:  # a group of one (no torchrun): a private rendezvous
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1
            )
        else:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, mine = dist.get_rank(), None
    for first in range(0, world_size, context_parallel):  # every process makes every group
        ranks = list(range(first, first + context_parallel))
        group = dist.new_group(ranks) if context_parallel > 1 else None
        if rank in ranks:
            mine = group
    return Layout(rank, world_size, device, context_parallel, mine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parallelize(
    objective: torch.nn.Module,
    layout: Layout,
    parallel: str,
    precision: str,
    blocks: list[torch.nn.Module],
) -> torch.nn.Module:
    """The module a training step calls. `ddp`: `objective` wrapped in DDP (itself on one
    process; parameters a batch may leave without gradient, an adaptive softmax's tail cluster
    no target fell in, allowed). `fsdp`: its model sharded with FSDP2 (`fully_shard` on each of
    `blocks`, then on the whole), bf16/fp16 parameters in compute and fp32 gradient reduction
    under those precisions; the objective itself around it."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = PRECISIONS.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(objective.model, mp_policy=policy)
        return objective
    if layout.world_size == 1:
        return objective
    ids = [layout.device.index] if layout.device.type == "cuda" else None
    unused = any(isinstance(m, torch.nn.AdaptiveLogSoftmaxWithLoss) for m in objective.modules())
    return torch.nn.parallel.DistributedDataParallel(
        objective, device_ids=ids, find_unused_parameters=unused
    )


def gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """A context in which backward passes reduce gradients over processes (`sync`) or only
    accumulate them (the micro-batches before the last of an update)."""
    wrapped = getattr(wrapped, "_orig_mod", wrapped)  # under torch.compile, the module compiled
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    model = getattr(wrapped, "model", None)
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def as_float(x) -> float:
    """A scalar tensor (FSDP2: a DTensor, replicated) as a float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def synchronize() -> None:
    """Wait until every process of the group gets here (nothing without a group)."""
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Leave the group. Whatever still holds a group (DDP's reducer, kept by a reference cycle)
    is collected first, while the group is registered: a gloo group destroyed from such an object
    joins its worker threads holding the GIL, and hangs when a worker needs it (seen at exit)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all processes (identity with one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on one (e.g. a stop signal)."""
    return all_reduce_sum([float(flag)], device)[0] > 0
