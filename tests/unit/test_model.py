"""TransformerLM: exact parameter counts, causality, the loss it reports."""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.batch import IGNORE
from sbtrain.config import DecoderConfig
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM, count_parameters


def expected_parameters(v: int, t: int, n: int, d: int, f: int, learned: bool = True) -> int:
    """Counted by hand: embeddings (output tied), per block 2 LayerNorms, qkv, proj, 2-layer MLP."""
    per_block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return v * d + (t * d if learned else 0) + n * per_block + 2 * d


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_parameter_count_is_exact(positions):
    cfg = DecoderConfig(n_layers=2, n_heads=4, d_model=64, d_ff=256, positions=positions)
    model = TransformerLM(cfg, vocab_size=256, max_len=64)
    assert count_parameters(model) == expected_parameters(
        256, 64, 2, 64, 256, positions == "learned"
    )


def test_paper_size_parameter_count():
    cfg = DecoderConfig()  # 16 layers, d_model 512, d_ff 2048, softmax output
    model = TransformerLM(cfg, vocab_size=32_000, max_len=2048)
    assert count_parameters(model) == expected_parameters(32_000, 2048, 16, 512, 2048)


def test_future_tokens_do_not_change_past_outputs():
    torch.manual_seed(0)
    model = TransformerLM(
        DecoderConfig(n_layers=2, n_heads=4, d_model=32, d_ff=64, dropout=0.0), 50, 40
    ).eval()
    x = torch.randint(0, 50, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 50, (2, 15))
    assert torch.allclose(model(x)[:, :25], model(y)[:, :25], atol=1e-6)


@pytest.mark.parametrize("output", ["softmax", "adaptive"])
def test_loss_is_the_mean_negative_log_probability_of_scored_targets(output):
    torch.manual_seed(0)
    cfg = DecoderConfig(
        n_layers=1,
        n_heads=2,
        d_model=16,
        d_ff=32,
        dropout=0.0,
        output=output,
        adaptive_cutoffs=(10, 30),
    )
    model = TransformerLM(cfg, vocab_size=60, max_len=12).eval()
    x = torch.randint(0, 60, (3, 12))
    y = torch.randint(0, 60, (3, 12))
    y[0, :4] = IGNORE
    nll, n = model.loss(x, y)
    logp = model.log_probs(model(x)).double()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 12, dtype=torch.double), atol=1e-5)
    keep = y != IGNORE
    expected = -logp[keep].gather(1, y[keep][:, None]).sum()
    assert n == 32 and math.isclose(nll.item(), expected.item(), rel_tol=1e-5)


def test_adaptive_output_needs_a_cutoff_below_the_vocabulary():
    cfg = DecoderConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32, output="adaptive")
    with pytest.raises(UserError, match="none is below the vocabulary size 100"):
        TransformerLM(cfg, vocab_size=100, max_len=8)


def test_sequences_longer_than_the_learned_positions_are_refused():
    model = TransformerLM(DecoderConfig(n_layers=1, n_heads=2, d_model=16, d_ff=32), 20, max_len=8)
    with pytest.raises(UserError, match="exceed the model's 8 learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
