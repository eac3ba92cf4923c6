"""preprocess -> train -> eval-ppl through the real CLI, on a generated corpus and on wiki-leads."""

from __future__ import annotations

import json
import math

import pytest

from cli.main import main
from tests.conftest import DEBUG_RECIPE, WIKI_LEADS, expected_tokens, read_jsonl, write_corpus


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


def check(result, log, raw):
    assert result["split"] == "test"
    assert result["tokens"] == expected_tokens(raw / "wiki.test.raw")
    assert result["ppl"] == pytest.approx(math.exp(result["loss_nats"]), rel=1e-12)
    assert result["loss_bits"] == pytest.approx(result["loss_nats"] / math.log(2), rel=1e-12)
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # bits: the training loss falls


def generate(capsys, *args) -> dict:
    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generated_corpus_end_to_end(tmp_path, capsys):
    raw = write_corpus(tmp_path / "raw")
    result, log, ckpt = pipeline(tmp_path, raw, capsys, "train.max_updates=40")
    check(result, log, raw)

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
    result, log, _ = pipeline(tmp_path, WIKI_LEADS, capsys, *overrides)
    check(result, log, WIKI_LEADS)
