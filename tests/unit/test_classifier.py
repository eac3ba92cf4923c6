"""Classifiers: padding changes nothing, pooling over real tokens, the dual encoder's features,
parameter counts, and the recipe's contradictions."""

from __future__ import annotations

import pytest
import torch

from sbtrain.batch import pad
from sbtrain.classifier import Classifier, DualEncoderClassifier
from sbtrain.config import AttentionConfig, ConfigError, EncoderConfig
from sbtrain.tasks import TASKS, load_recipe, recipe_from_dict
from tests.conftest import ROOT

KINDS = {
    "full": {},
    "local": {"window": 4},
    "performer": {"n_features": 8, "seed": 3},
    "lsh": {"n_hashes": 2, "bucket_size": 2, "seed": 3},
    "scatterbrain": {"sparse": "local", "window": 4, "n_features": 8, "seed": 3},
}


def model(kind="full", pooling="cls", cls=Classifier, **options):
    attention = AttentionConfig(kind=kind, **options)
    cfg = EncoderConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.0,
                      pooling=pooling, attention=attention)  # fmt: skip
    torch.manual_seed(0)
    return cls(cfg, vocab_size=12, num_classes=3, max_len=20, pad_id=10, cls_id=11).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_document_scores_the_same_alone_or_padded_in_a_batch(kind, pooling):
    m = model(kind, pooling, **KINDS[kind])
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 10, (n,), generator=g) for n in (7, 13, 3, 20)]
    tokens, lengths = pad(docs, 10)
    assert tokens.shape == (4, 20) and lengths.tolist() == [7, 13, 3, 20]
    with torch.no_grad():
        batched = m(tokens, lengths)
        alone = torch.cat([m(d[None], torch.tensor([len(d)])) for d in docs])
        garbage = tokens.clone()  # what sits under the padding must not matter either
        garbage[torch.arange(20) >= lengths[:, None]] = 3
        other = m(garbage, lengths)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, other, rtol=1e-5, atol=1e-5)


def test_mean_pooling_is_the_mean_of_the_real_tokens_final_states():
    m = model(pooling="mean")
    tokens, lengths = pad([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])], 10)
    captured = {}
    m.encoder.ln_f.register_forward_hook(lambda mod, i, out: captured.update(h=out))
    with torch.no_grad():
        pooled = m.encoder(tokens, lengths)
    h = captured["h"]
    expected = torch.stack([h[0, :3].mean(0), h[1, :5].mean(0)])
    torch.testing.assert_close(pooled, expected)


def test_cls_pooling_reads_the_token_put_in_front():
    m = model(pooling="cls")
    tokens, lengths = pad([torch.tensor([1, 2, 3])], 10)
    captured = {}
    m.encoder.ln_f.register_forward_hook(lambda mod, i, out: captured.update(h=out))
    with torch.no_grad():
        pooled = m.encoder(tokens, lengths)
    assert captured["h"].shape[1] == 4  # CLS + 3 tokens
    torch.testing.assert_close(pooled, captured["h"][:, 0])


def test_dual_encoder_shares_one_encoder_and_reads_u_v_product_difference():
    m = model(cls=DualEncoderClassifier)
    single = model()
    d, hidden = 16, 16
    head_extra = (4 * d - d) * hidden  # only the head's first layer is wider
    n = sum(p.numel() for p in m.parameters())
    assert n == sum(p.numel() for p in single.parameters()) + head_extra
    a, la = pad([torch.tensor([1, 2, 3, 4])], 10)
    b, lb = pad([torch.tensor([5, 6])], 10)
    with torch.no_grad():
        u, v = m.encoder(a, la), m.encoder(b, lb)
        expected = m.head(torch.cat([u, v, u * v, u - v], -1))
        torch.testing.assert_close(m(a, la, b, lb), expected)


def test_every_task_name_reads_a_recipe_of_its_own_shape_and_others_are_refused():
    for name, task in TASKS.items():
        recipe = recipe_from_dict({"task": name})
        assert recipe.task == name and isinstance(recipe.model, task.schema.model)
        assert (recipe.data is None) == (task.schema.data is None)
        assert (recipe.settings is None) == (task.schema.settings is None)
    with pytest.raises(ConfigError, match=r"task must be one of lm \| copy"):
        recipe_from_dict({"task": "summarise"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.output=adaptive"], "unknown key model.output"),
        (["model.attention={kind: performer, n_features: 8, chunk_size: 4}"], "chunk_size"),
        (["listops.max_args=1"], "listops.max_args: must be at least 2, got 1"),
        (["copy.length=3"], "copy: settings of the copy task, but this recipe's task is listops"),
        (["data.tokenizer=word"], "unknown key data.tokenizer"),
    ],
)
def test_contradictions_of_a_classifier_recipe_are_one_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(ROOT / "recipes" / "lra" / "listops-cpu.yaml", overrides)
