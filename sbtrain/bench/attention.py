"""Forward+backward time and peak memory of every attention kind against sequence length.

    rows = run_attention_bench(lengths=(2048, 4096, 8192, 16384))

CPU memory is the growth of peak RSS (`ru_maxrss`) over one forward+backward, measured in a fresh
process per case (multiprocessing spawn), so cases cannot inherit each other's high-water mark;
timing runs in another fresh process, with every freed block kept for reuse
(`keep_freed_cpu_memory(mmap_threshold=2**30)`), so no pass page-faults its tensors in again.
CUDA memory is `torch.cuda.max_memory_allocated` above what the inputs already hold.
"""

from __future__ import annotations

import dataclasses
import itertools
import resource
import time

import torch

from sbtrain import bench
from sbtrain.attention import build_attention, dispatch
from sbtrain.distributed import keep_freed_cpu_memory, mallopt, pick_device
from sbtrain.errors import UserError

BENCH_KINDS = bench.PAPER_BUDGET


@dataclasses.dataclass(frozen=True)
class SpeedRow:
    """One case: `ms` forward+backward (best of the repeats), `peak_mib` memory above the inputs."""

    kind: str
    length: int
    ms: float
    peak_mib: float


def run_attention_bench(
    kinds: dict[str, tuple[str, dict]] | None = None,
    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    device: str = "cpu",
    repeats: int = 2,
    impl: str = "auto",
) -> list[SpeedRow]:
    """Measure every (kind, length), one after another; `kinds` maps a label to (kind, options);
    `impl` (auto | pytorch | fused) chooses the implementation of the kinds with fused kernels."""
    kinds = BENCH_KINDS if kinds is None else kinds
    return [
        measure(label, kind, options, length, batch, heads, head_dim, device, repeats, impl)
        for label, (kind, options) in kinds.items()
        for length in lengths
    ]


def measure(
    label: str,
    kind: str,
    options: dict,
    length: int,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    device: str = "cpu",
    repeats: int = 2,
    impl: str = "auto",
) -> SpeedRow:
    """Time and peak memory of one case; on CPU each in its own freshly spawned process."""
    case = (kind, options, length, batch, heads, head_dim, impl, device)
    if torch.device(device).type == "cpu":
        what = f"{label} at length {length}"
        ms = bench.in_fresh_process(what, _time_case, case, repeats)
        mib = bench.in_fresh_process(what, _memory_case, case)
    else:
        ms, mib = _time_case(case, repeats), _memory_case(case)
    return SpeedRow(label, length, ms, mib)


def _prepare(
    kind: str,
    options: dict,
    length: int,
    batch: int,
    heads: int,
    head_dim: int,
    impl: str,
    device: str,
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The module, warmed up on a short input (kernels loaded), and random fp32 inputs."""
    torch.manual_seed(0)
    attn = build_attention(kind, head_dim=head_dim, **options).to(device)
    dispatch.set_impl(attn, impl)
    _forward_backward(attn, *_inputs(batch, heads, 256, head_dim, device))
    return attn, _inputs(batch, heads, length, head_dim, device)


def _time_case(case: tuple, repeats: int) -> float:
    """Best milliseconds of `repeats` forward+backward passes (CPU: every freed block kept, so
    the time is the compute's, not page faults')."""
    if torch.device(case[-1]).type == "cpu":
        keep_freed_cpu_memory(mmap_threshold=2**30)
    attn, inputs = _prepare(*case)
    return 1000 * min(_forward_backward(attn, *inputs) for _ in range(repeats))


def _memory_case(case: tuple) -> float:
    """MiB allocated at the peak of one forward+backward, above the inputs."""
    device = torch.device(case[-1])
    if device.type == "cuda":
        attn, inputs = _prepare(*case)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _forward_backward(attn, *inputs)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _return_freed_memory()
    attn, inputs = _prepare(*case)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    _forward_backward(attn, *inputs)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _return_freed_memory() -> None:
    """Make glibc hand every freed block over 64 KiB back to the OS at once.

    By default it keeps freed blocks below its mmap threshold (up to 32 MiB) for reuse, so the
    peak RSS of short sequences (whose tensors fit under it) overstates their live memory and
    memory ratios between lengths come out wrong. Elsewhere (no glibc) this does nothing.
    """
    mallopt(M_MMAP_THRESHOLD=64 * 1024)


def _inputs(batch: int, heads: int, length: int, head_dim: int, device: str) -> list[torch.Tensor]:
    shape = (batch, heads, length, head_dim)
    qkv = [torch.randn(shape, device=device, requires_grad=True) for _ in range(3)]
    return [*qkv, torch.randn(shape, device=device)]


def _forward_backward(attn: torch.nn.Module, q, k, v, grad) -> float:
    """Seconds for one forward and backward pass."""
    for x in (q, k, v):
        x.grad = None
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    attn(q, k, v).backward(grad)
    sync()
    return time.perf_counter() - start


def memory_growth(rows: list[SpeedRow]) -> dict[str, list[float | None]]:
    """Per kind, peak memory ratio between consecutive lengths (2.0 = linear per doubling)."""
    ratios: dict[str, list[float | None]] = {}
    by_kind: dict[str, list[SpeedRow]] = {}
    for row in rows:
        by_kind.setdefault(row.kind, []).append(row)
    for kind, kind_rows in by_kind.items():
        kind_rows.sort(key=lambda r: r.length)
        ratios[kind] = [  # None where the shorter length's peak was too small to measure
            b.peak_mib / a.peak_mib if a.peak_mib > 0 else None
            for a, b in itertools.pairwise(kind_rows)
        ]
    return ratios


def main(
    kinds: list[str] | None = None,
    lengths: list[int] = (2048, 4096, 8192, 16384),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    device: str = "cpu",
    repeats: int = 2,
    impl: str = "auto",
    out: str | None = None,
) -> dict:
    """`sbtrain bench attention`: measure, print the table, write JSON to `out`."""
    unknown = set(kinds or ()) - set(BENCH_KINDS)
    if unknown:
        raise UserError(
            f"--kinds: unknown {', '.join(sorted(unknown))} (have {', '.join(BENCH_KINDS)})"
        )
    chosen = {k: BENCH_KINDS[k] for k in kinds} if kinds else BENCH_KINDS
    device = str(pick_device(device))  # one line, not a traceback, for a device not here
    rows = run_attention_bench(
        chosen, tuple(lengths), batch, heads, head_dim, device, repeats, impl
    )
    settings = {
        "impl": impl,
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "device": device,
        "kinds": {k: list(v) for k, v in chosen.items()},
    }
    meta = {
        "machine": bench.machine(),
        "settings": settings,
        "memory_ratio_per_step": memory_growth(rows),
    }
    return bench.report("attention", [dataclasses.asdict(r) for r in rows], out, meta)
