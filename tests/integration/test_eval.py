"""`sbtrain eval-ppl` against an independent computation, and its refusals."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli.main import main
from sbtrain import checkpoint
from sbtrain.model import TransformerLM
from sbtrain.tasks import recipe_from_dict
from tests.conftest import (
    DEBUG_RECIPE,
    one_error_line,
    uniform_checkpoint,
    uniform_nll,
    write_token_folder,
)


def eval_json(capsys, *args) -> dict:
    assert main(["eval-ppl", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def independent_nll(
    ckpt_path, tokens: np.ndarray, eol: int, length: int | None = None
) -> tuple[float, int]:
    """Summed NLL over non-overlapping blocks of `length` (default: the training length) of the
    split, written without sbtrain's datasets."""
    per_position = independent_nll_by_position(ckpt_path, tokens, eol, length)
    return sum(sum(nlls) for nlls in per_position), sum(len(nlls) for nlls in per_position)


def independent_nll_by_position(
    ckpt_path, tokens: np.ndarray, eol: int, length: int | None = None
) -> list[list[float]]:
    """The NLL of every target, grouped by its position in its block."""
    state = checkpoint.load(ckpt_path)
    recipe = recipe_from_dict(state["recipe"])
    model = TransformerLM(recipe.model, state["vocab_size"], recipe.data.tokens_per_sample)
    model.load_state_dict(state["model"])
    model.eval()
    stream = torch.tensor([eol, *tokens.tolist()])
    length = length or recipe.data.tokens_per_sample
    out = [[] for _ in range(length)]
    with torch.no_grad():
        for start in range(0, len(tokens), length):
            piece = stream[start : start + length + 1]
            logits = model(piece[None, :-1])[0] @ model.tok_emb.weight.t()
            nll = F.cross_entropy(logits.double(), piece[1:], reduction="none")
            for p, value in enumerate(nll.tolist()):
                out[p].append(value)
    return out


def test_eval_ppl_equals_an_independent_computation(trained_debug, token_folder, capsys):
    ckpt = trained_debug / "checkpoint_best.pt"
    r = eval_json(capsys, ckpt, "--split", "valid")
    tokens = np.fromfile(token_folder / "valid.bin", dtype=np.uint16)
    nll, count = independent_nll(ckpt, tokens, eol=2)
    assert r["tokens"] == count == len(tokens)  # every token of the split, once
    assert r["loss_nats"] == pytest.approx(nll / count, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["loss_bits"] == pytest.approx(nll / count / math.log(2), rel=1e-5)
    assert r["split"] == "valid"


@pytest.mark.parametrize("cutoffs", [None, [8, 40]], ids=["softmax", "adaptive"])
def test_a_model_with_all_equal_logits_scores_its_closed_form(
    trained_debug, token_folder, tmp_path, capsys, cutoffs
):
    """Zeroed final layer norm: ln 64 per token for the tied softmax; for the adaptive softmax
    (head: 8 words + 2 clusters; clusters of 32 and 24 words) the mean of ln 10, ln 10 + ln 32
    and ln 10 + ln 24 over the split's own tokens, counted from valid.bin."""
    overrides = {} if cutoffs is None else {"output": "adaptive", "adaptive_cutoffs": cutoffs}
    ckpt = uniform_checkpoint(
        trained_debug / "checkpoint_best.pt", tmp_path / "uniform.pt", **overrides
    )
    r = eval_json(capsys, ckpt, "--split", "valid")
    tokens = np.fromfile(token_folder / "valid.bin", dtype=np.uint16)
    truth = uniform_nll(tokens, 64, cutoffs)
    if cutoffs is None:
        assert truth == math.log(64)
    assert r["tokens"] == len(tokens) == 3000
    assert r["loss_nats"] == pytest.approx(truth, rel=1e-6)
    assert r["loss_bits"] == pytest.approx(truth / math.log(2), rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(truth), rel=1e-6)


def test_context_window_lowers_perplexity_and_scores_the_same_tokens(trained_debug, capsys):
    ckpt = trained_debug / "checkpoint_best.pt"
    plain = eval_json(capsys, ckpt, "--split", "valid")
    for c in (16, 48):
        r = eval_json(capsys, ckpt, "--split", "valid", "--context-window", c)
        assert r["tokens"] == plain["tokens"] and r["context_window"] == c
        assert r["ppl"] < plain["ppl"]


def test_text_output_names_every_figure(trained_debug, capsys):
    assert main(["eval-ppl", str(trained_debug / "checkpoint_best.pt"), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    for word in ("valid", "tokens", "nats", "bits", "ppl", "tokens/s"):
        assert word in out


def test_bad_input_gets_one_line_and_status_2(trained_debug, tmp_path, capsys):
    ckpt = trained_debug / "checkpoint_best.pt"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    tokens = np.arange(200, dtype=np.uint16) % 90
    other = write_token_folder(tmp_path / "other", {"test": tokens, "valid": tokens}, 96)
    cases = [
        ([tmp_path / "notes.pt"], "not a readable checkpoint"),
        ([cut], "truncated or corrupt"),
        ([tmp_path / "foreign.pt"], "not an sbtrain checkpoint"),
        ([tmp_path / "absent.pt"], "checkpoint not found"),
        ([ckpt, "--split", "test"], "split 'test' was not preprocessed"),
        ([ckpt, "--context-window", "64"], "--context-window 64: must be in [0, 64)"),
        ([ckpt, "--attention", "full", "window=8"], "does not take window"),
        ([ckpt, "--attention", "nope"], "model.attention: unknown attention kind 'nope'"),
        ([ckpt, "--attention", "local", "window=["], "is not key=value with a YAML value"),
        ([ckpt, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (
            [ckpt, "--data", other],
            "(vocab_size 96 in the data, 64 in the model): give the folder it was trained",
        ),
        ([ckpt, "--tokens-per-sample", "65"], "--tokens-per-sample 65: the model has 64 learned"),
        ([ckpt, "--tokens-per-sample", "0"], "--tokens-per-sample 0: must be at least 1"),
        ([ckpt, "--tokens-per-sample", "32", "--context-window", "32"], "must be in [0, 32)"),
        ([ckpt, "--by-position", "0"], "--by-position 0: must be at least 1"),
        ([ckpt, "--plot", tmp_path / "p.png"], "give --by-position K too"),
    ]
    for args, message in cases:
        assert main(["eval-ppl", *map(str, args)]) == 2, args
        assert message in one_error_line(capsys)


def test_attention_swap_draws_fresh_buffers_of_the_new_shape(token_folder, tmp_path, capsys):
    """A performer model (8 features) evaluated with 4 features, with scatterbrain (a window and
    4 features) and with full attention: the old projection is dropped, not loaded into the new
    kernel (its shape would not fit), and the swapped kernel is the one that scores."""
    save = tmp_path / "performer"
    args = [
        "train",
        str(DEBUG_RECIPE),
        f"data.dir={token_folder}",
        f"train.save_dir={save}",
        "train.tensorboard=false",
        "train.max_updates=30",
        "model.attention={kind: performer, n_features: 8}",
    ]
    assert main(args) == 0
    capsys.readouterr()
    ckpt = save / "checkpoint_last.pt"
    own = eval_json(capsys, ckpt, "--split", "valid")
    fewer = eval_json(capsys, ckpt, "--split", "valid", "--attention", "performer", "n_features=4")
    exact = eval_json(capsys, ckpt, "--split", "valid", "--attention", "full")
    spec = ["scatterbrain", "sparse=local", "window=16", "n_features=4"]
    mixed = eval_json(capsys, ckpt, "--split", "valid", "--attention", *spec)
    runs = (own, fewer, exact, mixed)
    assert [r["tokens"] for r in runs] == [3000] * 4
    assert [r["attention"] for r in runs] == ["performer", "performer", "full", "scatterbrain"]
    assert len({r["loss_nats"] for r in runs}) == 4
    again = eval_json(capsys, ckpt, "--split", "valid", "--attention", "performer", "n_features=4")
    assert again["loss_nats"] == fewer["loss_nats"]  # buffers drawn from train.seed


def expected_bucket_tokens(split: int, n: int, k: int) -> list[int]:
    """Scored targets per bucket of k positions: blocks of n cover the split, the last one
    short, so position p holds split // n targets, plus one if p < split % n."""
    per_position = [split // n + (p < split % n) for p in range(n)]
    return [sum(per_position[b : b + k]) for b in range(0, n, k)]


@pytest.mark.parametrize(("n", "k"), [(64, 10), (40, 7), (64, 64)])
def test_by_position_buckets_add_up_to_the_whole_split(trained_debug, token_folder, capsys, n, k):
    ckpt = trained_debug / "checkpoint_best.pt"
    r = eval_json(capsys, ckpt, "--split", "valid", "--tokens-per-sample", n, "--by-position", k)
    buckets = r["by_position"]
    split = len(np.fromfile(token_folder / "valid.bin", dtype=np.uint16))
    assert [b["tokens"] for b in buckets] == expected_bucket_tokens(split, n, k)
    assert sum(b["tokens"] for b in buckets) == r["tokens"] == split
    assert [(b["start"], b["end"]) for b in buckets] == [(s, min(s + k, n)) for s in range(0, n, k)]
    mean = sum(b["loss_nats"] * b["tokens"] for b in buckets) / r["tokens"]
    assert mean == pytest.approx(r["loss_nats"], rel=1e-9)
    assert all(b["ppl"] == pytest.approx(math.exp(b["loss_nats"])) for b in buckets)
    assert r["tokens_per_sample"] == n and r["trained_tokens_per_sample"] == 64
    tokens = np.fromfile(token_folder / "valid.bin", np.uint16)
    per_position = independent_nll_by_position(ckpt, tokens, 2, n)
    for b in buckets:
        nlls = [x for p in range(b["start"], b["end"]) for x in per_position[p]]
        assert b["tokens"] == len(nlls)
        assert b["loss_nats"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_by_position_with_a_context_window_counts_positions_from_the_block_start(
    trained_debug, token_folder, capsys
):
    """With --context-window C, a target's position is the number of tokens the model sees
    before it: only the first blocks, with less context before them, score positions below C
    (blocks of 16 targets: the first at 0-15, the second at 16-31, the third at 32-47)."""
    ckpt = trained_debug / "checkpoint_best.pt"
    args = ("--split", "valid", "--context-window", 48, "--by-position", 16)
    r = eval_json(capsys, ckpt, *args)
    assert [b["start"] for b in r["by_position"]] == [0, 16, 32, 48]
    assert [b["tokens"] for b in r["by_position"]] == [16, 16, 16, 3000 - 48]
    text_args = [str(a) for a in args]
    assert main(["eval-ppl", str(ckpt), *text_args]) == 0
    out = capsys.readouterr().out
    assert "| 0-15 | 16 |" in out and "| 48-63 | 2,952 |" in out


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["sinusoidal", "rope"])
def test_sinusoidal_and_rope_models_score_past_the_training_length(
    token_folder, tmp_path, capsys, positions
):
    save = tmp_path / positions
    args = [
        *("train", str(DEBUG_RECIPE), f"data.dir={token_folder}", f"train.save_dir={save}"),
        *("train.tensorboard=false", "train.max_updates=20", f"model.positions={positions}"),
    ]
    assert main(args) == 0
    capsys.readouterr()
    ckpt = save / "checkpoint_last.pt"
    r = eval_json(capsys, ckpt, "--split", "valid", "--tokens-per-sample", 256)
    tokens = np.fromfile(token_folder / "valid.bin", dtype=np.uint16)
    nll, count = independent_nll(ckpt, tokens, eol=2, length=256)
    assert r["tokens"] == count == 3000 and r["positions"] == positions
    assert r["loss_nats"] == pytest.approx(nll / count, rel=1e-5)


def test_plot_writes_a_png_or_says_matplotlib_is_missing(trained_debug, tmp_path, capsys):
    ckpt = trained_debug / "checkpoint_best.pt"
    png = tmp_path / "by-position.png"
    args = ["eval-ppl", str(ckpt), "--split", "valid", "--by-position", "16", "--plot", str(png)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
        assert main(args) == 2
        assert "--plot needs matplotlib: pip install 'sbtrain[plot]'" in one_error_line(capsys)
    pytest.importorskip("matplotlib", reason="the PNG itself needs the optional plot extra")
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
