"""The one place that decides whether the fused Triton kernels or the PyTorch path compute
`scatterbrain` (sparse=local) and `performer` attention.

    out = dispatch.attention(module.impl, q, k, v, module.projection, window, pytorch_forward)
    dispatch.set_impl(model, "pytorch")    # every such module of a model (train.attention_impl)

`impl`, the recipe's `train.attention_impl` (eval-ppl / generate: `--attention-impl`):
- `auto` (default): the fused kernels where they can serve the call, else the PyTorch path. A
  missing or too old Triton or torch, a card below compute capability 8.0, a dtype or shape the
  kernels do not take, and any exception while compiling or launching a kernel each send the
  call to the PyTorch path with one `FusedFallbackWarning` naming the reason, once per process
  per reason. A kernel that failed once is not tried again for that configuration (device,
  dtype, head_dim, features, window). A failure in the fused backward recomputes the gradients
  through the PyTorch path from the saved inputs (the forward output stays the fused one).
  CPU tensors take the PyTorch path silently: the kernels are for CUDA, and Triton's
  interpreter (TRITON_INTERPRET=1) is a checking tool, used under `auto` only where
  `INTERPRETER_SERVES_CPU` is set (the tests set it).
- `pytorch`: never the kernels.
- `fused`: the kernels (on CPU tensors only under TRITON_INTERPRET=1), or `FusedUnavailable`, a
  UserError: one line naming the reason, exit status 2 on the command line.
Not caught, under any impl: out of memory (the PyTorch path needs more), and asynchronous CUDA
faults such as an illegal address, which poison the CUDA context for any later computation.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from sbtrain.attention import triton_kernels
from sbtrain.errors import UserError

IMPLS = ("auto", "pytorch", "fused")
# The oldest versions the kernels were checked with (setup.cfg asks for the same; a test says so).
TORCH_FLOOR = "2.13"
TRITON_FLOOR = "3.6"
MIN_CAPABILITY = (8, 0)  # bf16 and tf32 tensor-core dots
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 128  # a (BLOCK x D) tile per operand in registers; larger is untried
INTERPRETER_SERVES_CPU = False  # tests: `auto` runs the kernels on CPU under TRITON_INTERPRET=1

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FusedUnavailable(UserError):
    """attention_impl=fused, and the fused kernels cannot serve a call."""


class FusedFallbackWarning(RuntimeWarning):
    """attention_impl=auto took the PyTorch path where the fused kernels were meant to run."""


_warned: set[str] = set()  # reasons already warned about in this process
_failed: set[tuple] = set()  # configurations whose kernels raised: the PyTorch path from then on


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLS)}, got {impl!r}")


def check_device(impl: str, device: torch.device) -> None:
    """Refuse `fused` on a device the kernels cannot run on (CUDA; CPU under TRITON_INTERPRET)."""
    if impl == "fused" and device.type != "cuda" and not triton_kernels.interpreting():
        raise FusedUnavailable(
            f"attention_impl=fused: the fused kernels need a CUDA device, this run is on "
            f"{device.type}; use attention_impl auto or pytorch"
        )


def fallbacks() -> list[str]:
    """The reasons `auto` has warned about in this process (benchmarks record them)."""
    return sorted(_warned)


def set_impl(model: nn.Module, impl: str) -> None:
    """Make every attention module of `model` that has a fused path use `impl`."""
    check_impl(impl)
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = impl


def attention(
    impl: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    window: int | None,
    pytorch: Forward,
) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, L, D) -> (B, H, L, D) in v's dtype, by the fused
    kernels (window > 0: Scatterbrain with that local window; 0: Performer; None: the caller has
    no kernel) or by `pytorch(q, k, v)`, as `impl` and the checks above decide."""
    check_impl(impl)
    if impl == "pytorch":
        return pytorch(q, k, v)
    reason, quiet = obstacle(impl, q, k, v, projection, window)
    if reason is not None:
        if impl == "fused":
            raise FusedUnavailable(_refusal(reason))
        if not quiet:
            _warn(reason)
        return pytorch(q, k, v)
    key = (q.device.type, q.dtype, q.shape[-1], projection.shape[0], window)
    if key in _failed:
        return pytorch(q, k, v)

    def backward_failed(error: Exception, *saved: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _failure(impl, key, "backward", error)
        return _pytorch_gradients(pytorch, *saved)

    try:
        return triton_kernels.scatterbrain_local(
            q, k, v, projection, window, on_backward_error=backward_failed
        )
    except (FusedUnavailable, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:
        _failure(impl, key, "forward", error)
        return pytorch(q, k, v)


def obstacle(
    impl: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    window: int | None,
) -> tuple[str | None, bool]:
    """(why the fused kernels cannot serve this call, or None; whether `auto` stays silent)."""
    if window is None:
        return "this attention has no fused kernel (only scatterbrain local, performer)", True
    if q.device.type != "cuda":
        interpreted = triton_kernels.interpreting() and (impl == "fused" or INTERPRETER_SERVES_CPU)
        if not interpreted:
            return f"the fused kernels need a CUDA device, got {q.device.type}", True
    versions = version_problem()
    if versions:
        return versions, False
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(q.device)
            need = ".".join(map(str, MIN_CAPABILITY))
            return f"{name} has compute capability {major}.{minor}, the kernels need {need}", False
    if q.dtype not in DTYPES:
        return f"the fused kernels take fp32, bf16 or fp16 inputs, got {q.dtype}", False
    if not (q.dtype == k.dtype == v.dtype) or not (q.shape == k.shape == v.shape):
        return "q, k and v differ in shape or dtype", False
    if window % 16:
        return f"window {window} is not a multiple of 16", False
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is over {MAX_HEAD_DIM}", False
    return None, False


@functools.cache  # versions do not change within a process: checked once, not every call
def version_problem() -> str | None:
    try:
        import triton
    except ImportError:
        return "Triton is not installed (pip install 'sbtrain[kernels]')"
    except Exception as error:  # a broken install
        return f"Triton does not import ({_describe(error)})"
    for name, version, floor in [
        ("Triton", triton.__version__, TRITON_FLOOR),
        ("torch", torch.__version__, TORCH_FLOOR),
    ]:
        if _release(version) < _release(floor):
            return f"{name} {version} is older than {floor}, the oldest checked with the kernels"
    return None


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): the leading numbers of a version string."""
    return tuple(int(x) for x in re.findall(r"\d+", str(version).split("+")[0])[:3])


def _describe(error: Exception) -> str:
    """'Type: first line of the message' (a Triton CompilationError: its own message, not the
    source excerpt in front of it)."""
    message = getattr(error, "error_message", None) or str(error)
    lines = message.strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _refusal(reason: str) -> str:
    return f"attention_impl=fused: {reason}; use attention_impl=auto or pytorch"


def _warn(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"the fused attention kernels cannot serve this run: {reason}; computing it with the "
        "PyTorch path instead (same results, slower; attention_impl=pytorch avoids this warning)",
        FusedFallbackWarning,
        stacklevel=2,
    )


def _failure(impl: str, key: tuple, where: str, error: Exception) -> None:
    """A kernel raised: under `fused` that is the error; under `auto` warn, never retry `key`."""
    reason = f"the fused {where} pass failed ({_describe(error)})"
    if impl == "fused":
        raise FusedUnavailable(_refusal(reason)) from error
    _failed.add(key)
    _warn(reason)


def _pytorch_gradients(
    pytorch: Forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """d loss / d (q, k, v) by the PyTorch path, recomputed from the inputs."""
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = pytorch(*inputs)
    return torch.autograd.grad(out, inputs, grad_out)
