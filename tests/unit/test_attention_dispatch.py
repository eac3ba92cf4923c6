"""The switch between the fused kernels and the PyTorch path (sbtrain/attention/dispatch.py).

On a CPU the fused path runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), which
`auto` uses for CPU tensors only with `INTERPRETER_SERVES_CPU` (set here). Failures are injected
by replacing one kernel with a stub that raises Triton's own exception types; every fallback
must give the PyTorch path's outputs and gradients, with one warning over several calls.
"""

from __future__ import annotations

import configparser
import re
import sys
import warnings

import pytest
import torch

from sbtrain.attention import build_attention, dispatch, triton_kernels
from tests.conftest import DEBUG_RECIPE, ROOT, one_error_line

triton = pytest.importorskip("triton", reason="Triton is not installed: the fused path is untested")
pytestmark = pytest.mark.skipif(
    not triton_kernels.interpreting() and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = {
    "scatterbrain": ("scatterbrain", dict(sparse="local", window=16)),
    "performer": ("performer", {}),
}


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a new process would: nothing warned, nothing failed; and `auto`
    tries the interpreter on CPU tensors."""
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_failed", set())
    monkeypatch.setattr(dispatch, "INTERPRETER_SERVES_CPU", True)
    dispatch.version_problem.cache_clear()  # the tests below fake other versions
    yield
    dispatch.version_problem.cache_clear()


def build(name: str, impl: str = "auto", window: int | None = None, head_dim: int = 16):
    kind, options = KINDS[name]
    if window is not None:
        options = {**options, "window": window}
    module = build_attention(kind, head_dim=head_dim, n_features=32, seed=0, **options)
    module = module.to(DEVICE)
    module.impl = impl
    return module


def qkv(length=40, head_dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 2, length, head_dim)
    return [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3)]


def run(forward, inputs):
    """Output and q, k, v gradients of `forward` for a fixed output gradient."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = forward(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def calls(forward, inputs, times=3):
    """Run `times` forward+backward passes; returns the last results and the fallback warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # only dispatch's own once-per-process rule may filter
        for _ in range(times):
            results = run(forward, inputs)
    return results, [w for w in caught if issubclass(w.category, dispatch.FusedFallbackWarning)]


def count_kernel_calls(monkeypatch) -> list:
    seen = []
    original = triton_kernels.scatterbrain_local

    def counted(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "scatterbrain_local", counted)
    return seen


def failing(monkeypatch, kernel: str, error: Exception) -> None:
    """Kernel `kernel` of triton_jit raises `error` at launch (as compiling it would)."""
    original = triton_kernels._tuned

    class Raises:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise error

            return launch

    def tuned(name):
        return Raises() if name == kernel else original(name)

    monkeypatch.setattr(triton_kernels, "_tuned", tuned)


def assert_same(got, want, tolerance=0.0):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if tolerance:
            assert float((g - w).norm() / w.norm()) < tolerance
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("name", KINDS)
def test_auto_runs_the_fused_kernels_when_they_serve(name, monkeypatch):
    module = build(name)
    seen = count_kernel_calls(monkeypatch)
    got, fallbacks = calls(module, qkv(), times=2)
    assert len(seen) == 2 and not fallbacks
    assert_same(got, run(module.pytorch_forward, qkv()), tolerance=1e-5)


def compile_error():
    return triton.compiler.errors.CompilationError(None, None, "injected: unsupported layout")


def out_of_resources():
    return triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize(
    "kernel, error",
    [("key_block_sums_kernel", compile_error), ("forward_kernel", out_of_resources)],
)
def test_a_forward_failure_falls_back_with_one_warning(name, kernel, error, monkeypatch):
    module = build(name)
    failing(monkeypatch, kernel, error())
    seen = count_kernel_calls(monkeypatch)
    got, fallbacks = calls(module, qkv())
    assert_same(got, run(module.pytorch_forward, qkv()))
    assert len(fallbacks) == 1 and len(seen) == 1  # not retried after the failure
    message = str(fallbacks[0].message)
    assert "the fused forward pass failed" in message and type(error()).__name__ in message


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize(
    "kernel, error",
    [("backward_key_kernel", out_of_resources), ("backward_query_kernel", compile_error)],
)
def test_a_backward_failure_recomputes_the_gradients(name, kernel, error, monkeypatch):
    """The first call's output is the fused one, its gradients the PyTorch path's; later calls
    take the PyTorch path throughout."""
    module = build(name)
    failing(monkeypatch, kernel, error())
    want = run(module.pytorch_forward, qkv())
    first, fallbacks = calls(module, qkv(), times=1)
    assert_same(first[:1], want[:1], tolerance=1e-5)
    assert_same(first[1:], want[1:])
    later, more = calls(module, qkv(), times=2)
    assert_same(later, want)
    assert len(fallbacks) == 1 and not more
    assert "the fused backward pass failed" in str(fallbacks[0].message)


@pytest.mark.parametrize(
    "kernel", ["key_block_sums_kernel", "backward_query_kernel"], ids=["forward", "backward"]
)
def test_fused_turns_a_kernel_failure_into_one_clear_error(kernel, monkeypatch):
    module = build("scatterbrain", impl="fused")
    failing(monkeypatch, kernel, out_of_resources())
    with pytest.raises(dispatch.FusedUnavailable, match=r"^attention_impl=fused: the fused \w+"):
        run(module, qkv())


def old_triton(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    return "Triton 3.5.1 is older than 3.6"


def old_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu126")
    return "torch 2.12.0+cu126 is older than 2.13"


def no_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    return "Triton is not installed"


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("versions", [old_triton, old_torch, no_triton])
def test_missing_or_old_versions_take_the_pytorch_path(name, versions, monkeypatch):
    module = build(name)
    seen = count_kernel_calls(monkeypatch)
    reason = versions(monkeypatch)
    got, fallbacks = calls(module, qkv())
    assert_same(got, run(module.pytorch_forward, qkv()))
    assert not seen and len(fallbacks) == 1 and reason in str(fallbacks[0].message)
    module.impl = "fused"
    with pytest.raises(dispatch.FusedUnavailable, match=re.escape(reason)):
        module(*qkv())


@pytest.mark.parametrize(
    "build_args, inputs, reason",
    [
        ({}, dict(dtype=torch.float64), "take fp32, bf16 or fp16 inputs, got torch.float64"),
        (dict(window=24), {}, "window 24 is not a multiple of 16"),
        (dict(head_dim=160), dict(head_dim=160), "head_dim 160 is over 128"),
    ],
    ids=["dtype", "window", "head_dim"],
)
def test_inputs_the_kernels_do_not_take(build_args, inputs, reason, monkeypatch):
    module = build("scatterbrain", **build_args)
    seen = count_kernel_calls(monkeypatch)
    got, fallbacks = calls(module, qkv(**inputs))
    assert_same(got, run(module.pytorch_forward, qkv(**inputs)))
    assert not seen and len(fallbacks) == 1 and reason in str(fallbacks[0].message)
    module.impl = "fused"
    with pytest.raises(dispatch.FusedUnavailable) as refused:
        module(*qkv(**inputs))
    assert str(refused.value).startswith("attention_impl=fused: ")
    assert str(refused.value).endswith(f"{reason}; use attention_impl=auto or pytorch")


def test_pytorch_never_calls_the_kernels(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the fused kernels were called")

    monkeypatch.setattr(triton_kernels, "scatterbrain_local", never)
    for name in KINDS:
        module = build(name, impl="pytorch")
        got, fallbacks = calls(module, qkv(), times=1)
        assert_same(got, run(module.pytorch_forward, qkv()))
        assert not fallbacks


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors")
def test_cpu_tensors_take_the_pytorch_path_silently_unless_fused(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRETER_SERVES_CPU", False)
    seen = count_kernel_calls(monkeypatch)
    module = build("scatterbrain")
    _, fallbacks = calls(module, qkv(), times=1)
    assert not seen and not fallbacks
    module.impl = "fused"  # asked for: the interpreter serves it
    run(module, qkv())
    assert len(seen) == 1
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    with pytest.raises(dispatch.FusedUnavailable, match="need a CUDA device, got cpu"):
        module(*qkv())


def test_lsh_has_no_kernel_and_says_so_only_when_fused_is_asked(monkeypatch):
    seen = count_kernel_calls(monkeypatch)
    module = build_attention("scatterbrain", head_dim=16, sparse="lsh", n_features=32, seed=0)
    _, fallbacks = calls(module, qkv(), times=1)
    assert not seen and not fallbacks
    module.impl = "fused"
    with pytest.raises(dispatch.FusedUnavailable, match="has no fused kernel"):
        module(*qkv())


def test_the_recipe_key_reaches_every_layer():
    from sbtrain.tasks import build_model, load_recipe

    override = "model.attention={kind: scatterbrain, sparse: local, window: 16, n_features: 16}"
    recipe = load_recipe(DEBUG_RECIPE, [override, "train.attention_impl=pytorch"])
    impls = [m.impl for m in build_model(recipe, vocab_size=64).modules() if hasattr(m, "impl")]
    assert impls == ["pytorch"] * recipe.model.n_layers
    with pytest.raises(ValueError, match="attention_impl must be one of auto, pytorch, fused"):
        dispatch.set_impl(build_model(recipe, vocab_size=64), "triton")


@pytest.mark.parametrize(
    "args",
    [
        ["train", str(DEBUG_RECIPE), "train.attention_impl=triton"],
        ["eval-ppl", "missing.pt", "--attention-impl", "triton"],
        ["generate", "missing.pt", "--prompt", "a", "--attention-impl", "triton"],
        ["bench", "attention", "--impl", "triton"],
    ],
    ids=["train", "eval-ppl", "generate", "bench"],
)
def test_an_unknown_impl_is_one_error_line(args, capsys):
    from cli.main import main

    assert main(args) == 2
    line = one_error_line(capsys)
    assert "triton" in line and "pytorch" in line and "fused" in line


def test_setup_cfg_asks_for_the_checked_floors():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requires = setup["options"]["install_requires"].split()
    kernels = setup["options.extras_require"]["kernels"].split()
    assert f"torch>={dispatch.TORCH_FLOOR}" in requires
    assert f"triton>={dispatch.TRITON_FLOOR}" in kernels
