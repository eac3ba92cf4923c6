"""Decoding one token at a time equals the full forward pass, for every attention kind."""

from __future__ import annotations

import pytest
import torch

from sbtrain.config import AttentionConfig, DecoderConfig
from sbtrain.generate import filter_logits, sample
from sbtrain.model import TransformerLM

KINDS = {
    "full": AttentionConfig(kind="full"),
    "local": AttentionConfig(kind="local", window=7),
    "performer": AttentionConfig(kind="performer", n_features=16, chunk_size=9),
    "lsh": AttentionConfig(kind="lsh", n_hashes=2, bucket_size=3, n_buckets=4),
    "scatterbrain-local": AttentionConfig(
        kind="scatterbrain", sparse="local", window=6, n_features=16
    ),
    "scatterbrain-lsh": AttentionConfig(
        kind="scatterbrain", sparse="lsh", n_hashes=2, bucket_size=3, n_buckets=4, n_features=16
    ),
    "scatterbrain-local+lsh": AttentionConfig(
        kind="scatterbrain",
        sparse="local+lsh",
        window=5,
        n_hashes=1,
        bucket_size=3,
        n_buckets=4,
        n_features=16,
    ),
}
STEPS = 301  # not a multiple of any window, chunk or bucket size above


def model_with(
    attention: AttentionConfig, max_len: int = STEPS + 8, positions: str = "learned"
) -> TransformerLM:
    torch.manual_seed(0)
    cfg = DecoderConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, dropout=0.0,
                      positions=positions, attention=attention)  # fmt: skip
    return TransformerLM(cfg, vocab_size=50, max_len=max_len).eval()


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("name", KINDS)
def test_step_by_step_decoding_equals_the_full_forward_pass(name, positions):
    """rope: a step at position p rotates by p, and the caches hold rotated keys (and, with LSH,
    the unrotated ones the buckets come from)."""
    model = model_with(KINDS[name], positions=positions)
    tokens = torch.randint(0, 50, (2, STEPS))
    with torch.no_grad():
        full = model.log_probs(model(tokens))
        steps, caches = [], None
        for t in range(STEPS):
            hidden, caches = model.decode(tokens[:, t : t + 1], caches, start=t)
            steps.append(model.log_probs(hidden))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("name", KINDS)
def test_prefill_then_steps_equals_the_full_forward_pass(name, positions):
    model = model_with(KINDS[name], positions=positions)
    tokens = torch.randint(0, 50, (1, 150))
    with torch.no_grad():
        full = model.log_probs(model(tokens))
        hidden, caches = model.decode(tokens[:, :113], None, start=0)
        parts = [model.log_probs(hidden)]
        for t in range(113, 150):
            hidden, caches = model.decode(tokens[:, t : t + 1], caches, start=t)
            parts.append(model.log_probs(hidden))
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_sampling_follows_the_argmax_of_the_forward_pass():
    model = model_with(KINDS["scatterbrain-local"])
    prompt = [3, 14, 15, 9, 2]
    out, logprobs = sample(model, prompt, max_tokens=12, temperature=0)
    seq = prompt + out
    with torch.no_grad():
        forward = model.log_probs(model(torch.tensor([seq[:-1]])))[0, len(prompt) - 1 :]
    assert out == forward.argmax(-1).tolist()
    assert logprobs == pytest.approx(forward[torch.arange(12), out].tolist(), abs=1e-5)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = model_with(KINDS["performer"])
    a = sample(model, [1, 2, 3], 20, temperature=1.0, seed=7)
    assert a == sample(model, [1, 2, 3], 20, temperature=1.0, seed=7)
    assert a.tokens != sample(model, [1, 2, 3], 20, temperature=1.0, seed=8).tokens
    assert sample(model, [1, 2, 3], 20, top_k=1, seed=5) == sample(
        model, [1, 2, 3], 20, temperature=0
    )


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])  # unsorted: ranks 1, 3, 4, 0, 2
    logits = torch.log(probs)[None]

    def kept(out):
        return sorted(torch.isfinite(out[0]).nonzero().flatten().tolist())

    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 3]  # 0.5 < 0.6 <= 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == [1, 3, 4]
    assert kept(filter_logits(logits, top_p=0.4)) == [1]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [1, 3, 4]
