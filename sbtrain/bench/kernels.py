"""Forward+backward time of SDPA, the PyTorch path and the fused Triton kernels, per length.

    rows = time_kernels()   # CUDA: L in 2048..16384, B L = 32k tokens, H 8, D 64, bf16
    sbtrain bench kernels --out benchmarks/results/kernels-h100.json

Every implementation runs on the same inputs in the same process: causal SDPA (`full`), and for
Scatterbrain (local window 128, 128 features) and Performer (256 features) the module's PyTorch
forward (`pytorch`) and the fused kernels (`triton`) at each block size in `blocks` (the kernels'
chunk; the default is 32). Times are medians of CUDA-event timings after warmup (which includes
compiling and autotuning); each row also gives the peak memory above the inputs and, for
`triton`, the relative difference of its output from the PyTorch path on the same inputs (a
check that the compiled kernel is right at full size). On CPU (TRITON_INTERPRET=1) it runs,
slowly, on tiny shapes: for checking the harness, not for timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sbtrain import bench
from sbtrain.attention import build_attention, triton_kernels
from sbtrain.errors import UserError

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_kernels(
    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384),
    tokens: int = 32768,
    heads: int = 8,
    head_dim: int = 64,
    window: int = 128,
    n_features: int = 128,
    performer_features: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    warmup: int = 5,
    repeats: int = 20,
    blocks: tuple[int, ...] = (32, 64, 128),
) -> list[dict]:
    """One row per (length, kind, implementation): batch = tokens // length sequences.

    Row keys: card, kind, impl, length, batch, ms (median forward+backward), peak_mib, and for
    `triton` block and rel_diff (|out - out_pytorch| / |out_pytorch|, Frobenius norms); a case
    that cannot run (e.g. a block whose tiles exceed the card's shared memory) has `error`
    instead of the measurements.
    """
    torch.manual_seed(0)
    card = _card(device)
    implementations = _implementations(
        head_dim, window, n_features, performer_features, device, blocks
    )
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        shape = (batch, heads, length, head_dim)
        inputs = [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in "qkv"]
        grad = torch.randn(shape, device=device, dtype=dtype)
        reference: dict[str, torch.Tensor] = {}  # kind -> its PyTorch path's output
        for kind, impl, block, attention in implementations:
            row = dict(card=card, kind=kind, impl=impl, length=length, batch=batch)
            if block is not None:
                row["block"] = block
            row.update(_case(attention, inputs, grad, warmup, repeats, reference, kind, impl))
            rows.append(row)
    return rows


def _implementations(
    head_dim: int, window: int, n_features: int, performer_features: int, device: str,
    blocks: tuple[int, ...],
) -> list[tuple[str, str, int | None, Attention]]:  # fmt: skip
    """(kind, impl, block, the call) of SDPA, and of scatterbrain (local) and performer on their
    PyTorch path and through the fused kernels at each block size that fits."""
    scatterbrain = build_attention(
        "scatterbrain", head_dim=head_dim, sparse="local", window=window, n_features=n_features
    ).to(device)
    performer = build_attention("performer", head_dim=head_dim, n_features=performer_features)
    performer = performer.to(device)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    out = [
        ("full", "sdpa", None, sdpa),
        ("scatterbrain", "pytorch", None, scatterbrain.pytorch_forward),
    ]
    out += [
        (
            "scatterbrain",
            "triton",
            block,
            _fused_scatterbrain(scatterbrain.projection, window, block),
        )
        for block in blocks
        if window % block == 0
    ]
    out.append(("performer", "pytorch", None, performer.pytorch_forward))
    out += [
        ("performer", "triton", block, _fused_performer(performer.projection, block))
        for block in blocks
    ]
    return out


def _case(attention, inputs, grad, warmup, repeats, reference, kind, impl) -> dict:
    """ms and peak_mib of one implementation (and rel_diff against the PyTorch path, which runs
    first); an `error` instead where it cannot run (e.g. tiles too large for the card)."""
    row = {}
    try:
        with torch.no_grad():
            out = attention(*inputs)
        if impl == "pytorch":
            reference[kind] = out
        elif kind in reference:
            expected = reference[kind].float()
            row["rel_diff"] = float((out.float() - expected).norm() / expected.norm())
        del out
        row["ms"], row["peak_mib"] = _measure(attention, inputs, grad, warmup, repeats)
    except Exception as error:  # recorded, not raised
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return row


def _fused_scatterbrain(projection: torch.Tensor, window: int, block: int) -> Attention:
    return lambda q, k, v: triton_kernels.scatterbrain_local(q, k, v, projection, window, block)


def _fused_performer(projection: torch.Tensor, block: int) -> Attention:
    return lambda q, k, v: triton_kernels.performer(q, k, v, projection, block)


def _measure(
    attention: Attention, inputs: list[torch.Tensor], grad: torch.Tensor, warmup: int, repeats: int
) -> tuple[float, float]:
    """(median ms of forward+backward, peak MiB above what was allocated before)."""

    def step() -> None:
        for x in inputs:
            x.grad = None
        attention(*inputs).backward(grad)

    cuda = inputs[0].is_cuda
    for _ in range(warmup):
        step()
    if not cuda:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))]
    events += [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(repeats - 1)]  # fmt: skip
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(s.elapsed_time(e) for s, e in events), peak


def _card(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu (TRITON_INTERPRET)"


def main(
    lengths: list[int] = (2048, 4096, 8192, 16384),
    tokens: int = 32768,
    dtype: str = "bf16",
    repeats: int = 20,
    blocks: list[int] = (32, 64, 128),
    out: str | None = None,
) -> dict:
    """`sbtrain bench kernels` (CUDA only): time, print the table, write JSON to `out`."""
    if not torch.cuda.is_available():
        raise UserError("bench kernels times CUDA kernels: no CUDA device here")
    import triton

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    rows = time_kernels(
        tuple(lengths), tokens, dtype=torch_dtype, repeats=repeats, blocks=tuple(blocks)
    )
    machine = {**bench.machine(torch.device("cuda")), "triton": triton.__version__}
    settings = {"tokens": tokens, "dtype": dtype, "repeats": repeats}
    return bench.report("kernels", rows, out, {"machine": machine, "settings": settings})
