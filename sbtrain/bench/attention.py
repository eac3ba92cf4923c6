"""Forward+backward time and peak memory of every attention kind against sequence length.

    rows = run_attention_bench(lengths=(2048, 4096, 8192, 16384))
    print(format_rows(rows))

CPU memory is the growth of peak RSS (`ru_maxrss`) over one forward+backward, measured in a fresh
process per case (multiprocessing spawn), so cases cannot inherit each other's high-water mark.
CUDA memory is `torch.cuda.max_memory_allocated` above what the inputs already hold.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import resource
import time

import torch

from sbtrain.attention import build_attention

# The paper-sized baselines, at matching per-query budgets (~256 keys or features).
BENCH_KINDS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "local": ("local", {"window": 128}),
    "performer": ("performer", {"n_features": 256}),
    "lsh": ("lsh", {"n_hashes": 2, "bucket_size": 128}),
    "scatterbrain": ("scatterbrain", {"sparse": "local", "window": 128, "n_features": 128}),
}


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
) -> list[SpeedRow]:
    """Measure every (kind, length), one after another; `kinds` maps a label to (kind, options)."""
    kinds = BENCH_KINDS if kinds is None else kinds
    return [
        measure(label, kind, options, length, batch, heads, head_dim, device, repeats)
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
) -> SpeedRow:
    """Time and peak memory of one case; on CPU in a fresh spawned process."""
    args = (kind, options, length, batch, heads, head_dim, device, repeats)
    if torch.device(device).type == "cpu":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            ms, mib = pool.apply(_run_case, args)
    else:
        ms, mib = _run_case(*args)
    return SpeedRow(label, length, ms, mib)


def _run_case(
    kind: str,
    options: dict,
    length: int,
    batch: int,
    heads: int,
    head_dim: int,
    device: str,
    repeats: int,
) -> tuple[float, float]:
    """(best ms of forward+backward, peak MiB of the first one) for random fp32 inputs."""
    torch.manual_seed(0)
    attn = build_attention(kind, head_dim=head_dim, **options).to(device)
    _forward_backward(attn, *_inputs(batch, heads, 256, head_dim, device))  # load kernels first
    inputs = _inputs(batch, heads, length, head_dim, device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = [_forward_backward(attn, *inputs)]
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times += [_forward_backward(attn, *inputs) for _ in range(repeats - 1)]
    return 1000 * min(times), peak_mib


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


def memory_growth(rows: list[SpeedRow]) -> dict[str, list[float]]:
    """Per kind, peak memory ratio between consecutive lengths (2.0 = linear per doubling)."""
    ratios: dict[str, list[float]] = {}
    by_kind: dict[str, list[SpeedRow]] = {}
    for row in rows:
        by_kind.setdefault(row.kind, []).append(row)
    for kind, kind_rows in by_kind.items():
        kind_rows.sort(key=lambda r: r.length)
        ratios[kind] = [b.peak_mib / a.peak_mib for a, b in itertools.pairwise(kind_rows)]
    return ratios


def format_rows(rows: list[SpeedRow]) -> str:
    """A plain-text table: kind, length, ms, peak MiB."""
    lines = [f"{'kind':<14}{'L':>8}{'ms':>12}{'peak MiB':>12}"]
    lines += [f"{r.kind:<14}{r.length:>8}{r.ms:>12.1f}{r.peak_mib:>12.1f}" for r in rows]
    return "\n".join(lines)
