"""Training long sequences in bounded memory: activation checkpointing and the chunked output
layer give the same losses and gradients as the plain computation, and the output layer never
forms a (tokens x vocabulary) tensor, forward or backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sbtrain.batch import IGNORE
from sbtrain.config import AttentionConfig, DecoderConfig
from sbtrain.model import TransformerLM
from tests.conftest import with_lsh_paths

KINDS = {
    "full": AttentionConfig(kind="full"),
    "local": AttentionConfig(kind="local", window=16),
    "performer": AttentionConfig(kind="performer", n_features=16),
    "lsh": AttentionConfig(kind="lsh", n_hashes=2, bucket_size=8),
    "scatterbrain-local": AttentionConfig(
        kind="scatterbrain", sparse="local", window=16, n_features=16
    ),
    "scatterbrain-lsh": AttentionConfig(
        kind="scatterbrain", sparse="lsh", n_hashes=2, bucket_size=8, n_features=16
    ),
    "scatterbrain-local+lsh": AttentionConfig(
        kind="scatterbrain", sparse="local+lsh", window=16, bucket_size=8, n_features=16
    ),
}


def small_model(attention=KINDS["full"], output="softmax", vocab=60, dropout=0.1, layers=2):
    torch.manual_seed(0)
    cfg = DecoderConfig(
        n_layers=layers,
        n_heads=2,
        d_model=32,
        d_ff=64,
        dropout=dropout,
        output=output,
        adaptive_cutoffs=(10, 30),
        attention=attention,
    )
    return TransformerLM(cfg, vocab_size=vocab, max_len=64).train()


def loss_and_grads(model, x, y, seed=1):
    """Summed NLL and every parameter's gradient, dropout drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    nll, _ = model.loss(x, y)
    nll.backward()
    return nll.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_same(a: dict, b: dict, rel: float = 1e-6):
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-30)
        assert err <= rel, f"{name}: relative difference {err:.2e}"


def batch(vocab=60, batch=2, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, length), generator=g)
    y = torch.randint(0, vocab, (batch, length), generator=g)
    y[0, :5] = IGNORE
    return x, y


@pytest.mark.parametrize("kind, lsh_path", with_lsh_paths(KINDS), indirect=["lsh_path"])
def test_checkpointed_blocks_give_the_same_gradients_with_dropout(kind, lsh_path):
    model = small_model(KINDS[kind])
    x, y = batch()
    plain_loss, plain = loss_and_grads(model, x, y)
    other_loss, _ = loss_and_grads(model, x, y, seed=2)
    assert other_loss != plain_loss  # dropout is on: another seed, another loss
    model.activation_checkpointing = True
    loss, grads = loss_and_grads(model, x, y)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0)
    assert_same(grads, plain)


def test_checkpointed_blocks_keep_only_their_inputs():
    """Tensors saved for backward outside the checkpoints: one (B, T, C) input per block, not
    the blocks' intermediates (qkv, feed-forward hidden, dropout masks)."""

    def saved_elements(model, x, y):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(x, y)
        return sum(sizes)

    model = small_model(layers=4, dropout=0.1)
    x, y = batch()
    plain = saved_elements(model, x, y)
    model.activation_checkpointing = True
    kept = saved_elements(model, x, y)
    f, tokens = 64, x.numel()
    # each block saves at least its feed-forward hidden state (T x d_ff) without checkpoints
    assert plain - kept >= 4 * tokens * f
    assert kept < plain / 3


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_output_layer_never_forms_all_scores_at_once(output):
    """400 positions x 3000 words: with 8,000 scores per chunk (2 or 3 positions; adaptive:
    its widest cluster is 2,970 words), no forward or backward tensor reaches a tenth of
    tokens x vocabulary, and the largest is bounded by the chunk and the weights."""
    vocab, d = 3000, 32
    model = small_model(output=output, vocab=vocab, dropout=0.0, layers=1)
    model.output_chunk_elements = 8000
    hidden = torch.randn(2, 200, d, requires_grad=True)
    targets = torch.randint(0, vocab, (2, 200))
    saved = []
    with LargestTensor() as seen:
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            nll = model.token_nll(hidden, targets)
        nll.sum().backward()
    assert sum(saved) < 400 * vocab / 10  # kept between the passes: no chunk's scores either
    weights = max(p.numel() for p in model.parameters())  # vocab x d: the embedding's gradient
    assert seen.largest <= max(weights, 8000) < hidden.shape[1] * 2 * vocab / 10
    model.output_chunk_elements = 10**9  # one chunk: the (tokens x vocabulary) scores appear
    with LargestTensor() as seen:
        model.token_nll(hidden, targets).sum().backward()
    # adaptive: the tail cluster's scores for every position whose target falls in it
    rows, width = (int((targets >= 30).sum()), vocab - 30) if output == "adaptive" else (400, vocab)
    assert seen.largest >= rows * width > 300 * vocab


@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_chunked_output_layer_gives_the_same_loss_and_gradients(output):
    model = small_model(output=output, dropout=0.0)
    x, y = batch()
    whole_loss, whole = loss_and_grads(model, x, y)
    model.output_chunk_elements = 7 * 60  # 7 positions per chunk (adaptive head: 12 wide -> 35)
    assert model._chunk_rows() < 20
    chunked_loss, chunked = loss_and_grads(model, x, y)
    assert torch.allclose(chunked_loss, whole_loss, rtol=1e-6, atol=0)
    assert_same(chunked, whole)
    with torch.no_grad():  # evaluation: per-token losses and predictions, chunk by chunk
        hidden = model.eval()(x)
        per_token = model.token_nll(hidden, y)
        guesses = model.predict(hidden.reshape(-1, 32))
        model.output_chunk_elements = 10**9
        assert torch.allclose(per_token, model.token_nll(hidden, y), rtol=1e-6, atol=1e-7)
        assert torch.equal(guesses, model.log_probs(hidden).reshape(-1, 60).argmax(-1))
        assert per_token.numel() == int((y != IGNORE).sum())


def test_checkpointing_with_the_fused_kernel_gives_the_same_gradients(monkeypatch):
    """Scatterbrain's fused Triton kernel inside checkpointed blocks, reached through the real
    dispatch (`attention_impl=fused`; Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    from sbtrain.attention import dispatch, triton_kernels

    if not torch.cuda.is_available() and not triton_kernels.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    calls = []
    kernel = triton_kernels.scatterbrain_local

    def counted(q, *args, **kwargs):
        calls.append(q.shape)
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "scatterbrain_local", counted)
    attention = AttentionConfig(kind="scatterbrain", sparse="local", window=16, n_features=32)
    model = small_model(attention, layers=1)
    dispatch.set_impl(model, "fused")
    x, y = batch(batch=1, length=40)
    plain_loss, plain = loss_and_grads(model, x, y)
    assert len(calls) == 1
    model.activation_checkpointing = True
    calls.clear()
    loss, grads = loss_and_grads(model, x, y)
    assert len(calls) == 2  # the forward pass and its recomputation
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0)
    assert_same(grads, plain)
