"""Every attention kind through the real CLI: preprocess -> train -> eval-ppl -> generate.

The raw corpus and its preprocessed folder are shared by all kinds (`word_corpus`); full attention
runs the same pipeline in test_pipeline.py. Debug size, 30 updates: a few seconds per kind.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from sbtrain.checkpoint import load_model
from sbtrain.tokenizer import load_tokenizer
from tests.conftest import DEBUG_RECIPE, expected_tokens, read_jsonl

LSH = "n_hashes: 2, bucket_size: 8, n_buckets: 4"
KINDS = {  # debug size: head_dim 16, 64 positions
    "scatterbrain-local": "{kind: scatterbrain, sparse: local, window: 16, n_features: 16}",
    "scatterbrain-lsh": f"{{kind: scatterbrain, sparse: lsh, n_features: 16, {LSH}}}",
    "scatterbrain-local+lsh": (
        f"{{kind: scatterbrain, sparse: local+lsh, window: 8, n_features: 16, {LSH}}}"
    ),
    "performer": "{kind: performer, n_features: 16}",
    "local": "{kind: local, window: 16}",
    "lsh": f"{{kind: lsh, {LSH}}}",
}
UPDATES = 30


def run_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("name", KINDS)
def test_every_kind_trains_evaluates_reloads_and_generates(name, word_corpus, tmp_path, capsys):
    raw, data = word_corpus
    save = tmp_path / name
    train = [
        "train",
        str(DEBUG_RECIPE),
        f"data.dir={data}",
        f"train.save_dir={save}",
        "train.tensorboard=false",
        f"train.max_updates={UPDATES}",
        "train.max_epochs=10",
        "train.log_interval=5",
        "model.dropout=0.0",
        f"model.attention={KINDS[name]}",
    ]
    assert main(train) == 0
    log = read_jsonl(save / "train.jsonl")
    assert log[-1]["update"] == UPDATES
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # bits: the loss falls

    # the checkpoint reloads to the model that was trained: its validation at the last update
    # (the in-memory model, inside `train`) equals eval-ppl of the saved file
    last = save / "checkpoint_last.pt"
    valid = read_jsonl(save / "valid.jsonl")[-1]
    reloaded = run_json(capsys, "eval-ppl", last, "--split", "valid")
    assert valid["update"] == UPDATES and reloaded["tokens"] == valid["tokens"]
    assert reloaded["loss_bits"] == pytest.approx(valid["loss"], rel=1e-6)

    test = run_json(capsys, "eval-ppl", last)
    kind = KINDS[name].split(",")[0].removeprefix("{kind: ").rstrip("}")
    assert test["attention"] == kind
    assert test["tokens"] == expected_tokens(raw / "wiki.test.raw")  # words + ends of line
    vocab = load_tokenizer(data).vocab_size
    assert test["ppl"] < vocab / 2  # well below a uniform guess over the vocabulary

    # decoding with the caches gives every generated token the log-probability the full forward
    # pass of the whole sequence gives it, and greedy decoding picks its argmax
    prompt = "w1 w2 w3"
    tokenizer = load_tokenizer(data)
    ids = [tokenizer.eol_id, *tokenizer.encode(prompt)]
    model, *_ = load_model(last, torch.device("cpu"))
    for how in (["--temperature", 0], ["--seed", 5]):
        out = run_json(capsys, "generate", last, "--prompt", prompt, "--max-tokens", 40, *how)
        sequence = torch.tensor([*ids, *out["tokens"]])
        with torch.no_grad():
            logp = model.log_probs(model(sequence[None, :-1]))[0, len(ids) - 1 :]
        assert out["logprobs"] == pytest.approx(
            logp[torch.arange(40), out["tokens"]].tolist(), abs=1e-5
        )
        if how[0] == "--temperature":
            assert logp.argmax(-1).tolist() == out["tokens"]
