"""An exported model under lm-evaluation-harness (its `hf` backend, offline) scores the
(context, continuation) pairs of a task written here exactly as sbtrain's own model does.

The truth is computed with sbtrain's model and tokenizer, not the exported folder: the sum of
log-probabilities of the continuation's tokens given the end-of-line token (every sbtrain
stream's start, which the exported tokenizer adds first) and the context's tokens.

Token boundaries, the same by construction: lm-eval encodes context + continuation and the
context alone (each with the tokenizer's special tokens, i.e. the end-of-line token first) and
scores the tokens of the whole beyond the context's. A multiple-choice task's continuation is
" " + choice, so the context's tokens are a prefix of the whole's and the continuation's tokens
are the choice's own: the word tokenizer splits on whitespace, and a sentencepiece piece never
spans a space (a space starts a new piece, "▁..."). An empty context becomes lm-eval's prefix
token, the tokenizer's BOS: the end-of-line token again.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub and datasets at import
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
HINT = "needs the eval extra: pip install -e '.[eval]'"
lm_eval = pytest.importorskip("lm_eval", reason=HINT)

from cli.main import main  # noqa: E402
from sbtrain.checkpoint import load_model  # noqa: E402
from sbtrain.tokenizer import load_tokenizer  # noqa: E402
from tests.integration.test_export import (  # noqa: E402
    MODELS,
    make_checkpoint,
    preprocess_sentencepiece,
)

TASK = """task: sbtrain_words
dataset_path: json
dataset_kwargs:
  data_files: {{test: {docs}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
DOCS = [
    {"context": "w1 w2 w3", "choices": ["w4", "w5 w6", "w0 w1 w2 w3"], "label": 0},
    {"context": "w7 w0 w5 w3 w1 w9", "choices": ["w2", "nosuchword w2"], "label": 1},
    {"context": "", "choices": ["w1 w2", "w3"], "label": 0},
]


def sbtrain_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | end-of-line, context): nats summed over the continuation's tokens."""
    context_ids = [tokenizer.eol_id, *tokenizer.encode(context)]
    ids = torch.tensor([[*context_ids, *tokenizer.encode(continuation)]])
    with torch.no_grad():
        nll = model.token_nll(model(ids)[:, :-1], ids[:, 1:])  # (T - 1,)
    return -float(nll[len(context_ids) - 1 :].sum())


@pytest.mark.parametrize("vocabulary", ["word", "sentencepiece"])
def test_lm_eval_scores_equal_sbtrain(vocabulary, word_corpus, tmp_path):
    from lm_eval.tasks import TaskManager

    if vocabulary == "word":
        data = word_corpus[1]
    else:
        data = preprocess_sentencepiece(tmp_path / "spm", "unigram")
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", MODELS["scatterbrain-local"])
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sbtrain_words.yaml").write_text(TASK.format(docs=docs, cache=tmp_path / "cache"))

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
        tasks=["sbtrain_words"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=1,
        log_samples=True,
    )
    samples = sorted(results["samples"]["sbtrain_words"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)

    model, *_ = load_model(ckpt, torch.device("cpu"), attention_impl="pytorch")
    tokenizer = load_tokenizer(data)
    correct = 0
    for doc, sample in zip(DOCS, samples):
        pairs = [tuple(arguments) for arguments in sample["arguments"]]
        assert pairs == [(doc["context"], " " + choice) for choice in doc["choices"]]
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [sbtrain_loglikelihood(model, tokenizer, *pair) for pair in pairs]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["label"]
    assert results["results"]["sbtrain_words"]["acc,none"] == pytest.approx(correct / len(DOCS))
