"""preprocess -> train -> eval-ppl through the real CLI, on a generated corpus and on wiki-leads."""

from __future__ import annotations

import json
import math

import pytest

from cli.main import main
from sbtrain.tokenizer import load_tokenizer
from tests.conftest import (
    DEBUG_RECIPE,
    WIKI_LEADS,
    expected_tokens,
    read_jsonl,
    uniform_checkpoint,
    write_corpus,
)


def pipeline(tmp_path, raw, capsys, *overrides):
    data = tmp_path / "bin"
    assert (
        main(["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}", *overrides])
        == 0
    )
    save = tmp_path / "ckpt"
    train = [
        "train",
        str(DEBUG_RECIPE),
        f"data.dir={data}",
        f"train.save_dir={save}",
        "train.tensorboard=false",
        "train.log_interval=5",
        *overrides,
    ]
    assert main(train) == 0
    capsys.readouterr()
    assert main(["eval-ppl", str(save / "checkpoint_best.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    return result, read_jsonl(save / "train.jsonl"), save / "checkpoint_best.pt"


def check(result, log, raw, ckpt, capsys):
    """Token counts from the raw text; the figures of eval-ppl against a closed form: the same
    checkpoint with all-equal logits scores ln V nats, log2 V bits, perplexity V, per token."""
    assert result["split"] == "test"
    assert result["tokens"] == expected_tokens(raw / "wiki.test.raw")
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # bits: the training loss falls
    uniform = uniform_checkpoint(ckpt, ckpt.with_name("uniform.pt"))
    assert main(["eval-ppl", str(uniform), "--json"]) == 0
    flat = json.loads(capsys.readouterr().out)
    vocab = load_tokenizer(ckpt.parent.parent / "bin").vocab_size
    assert flat["tokens"] == result["tokens"]
    assert flat["loss_nats"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert flat["loss_bits"] == pytest.approx(math.log2(vocab), rel=1e-6)
    assert flat["ppl"] == pytest.approx(vocab, rel=1e-6)
    assert result["ppl"] < vocab  # and the trained model beats it


def generate(capsys, *args) -> dict:
    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generated_corpus_end_to_end(tmp_path, capsys):
    raw = write_corpus(tmp_path / "raw")
    result, log, ckpt = pipeline(tmp_path, raw, capsys, "train.max_updates=40")
    check(result, log, raw, ckpt, capsys)

    sampled = generate(capsys, ckpt, "--prompt", "w1 w2 w3", "--max-tokens", 12, "--seed", 3)
    assert sampled["prompt_tokens"] == 3 and len(sampled["tokens"]) == 12
    again = generate(capsys, ckpt, "--prompt", "w1 w2 w3", "--max-tokens", 12, "--seed", 3)
    assert again["tokens"] == sampled["tokens"]  # seeded
    words = set((raw / "wiki.train.raw").read_text().split()) | {"<unk>"}
    assert set(sampled["text"].split()) <= words  # word tokens of the training vocabulary

    # 64 learned positions: the end-of-line before the prompt, 1 word, 62 tokens fed back
    assert generate(capsys, ckpt, "--prompt", "w1", "--max-tokens", 63)["prompt_tokens"] == 1
    assert main(["generate", str(ckpt), "--prompt", "w1", "--max-tokens", "64"]) == 2
    assert "need 65 positions, the model has 64" in capsys.readouterr().err


@pytest.mark.skipif(not WIKI_LEADS.is_dir(), reason=f"wiki-leads corpus not found at {WIKI_LEADS}")
def test_wiki_leads_end_to_end(tmp_path, capsys):
    overrides = ["data.vocab_size=4000", "train.max_updates=40", "train.max_valid_batches=4"]
    result, log, ckpt = pipeline(tmp_path, WIKI_LEADS, capsys, *overrides)
    check(result, log, WIKI_LEADS, ckpt, capsys)
