"""What a newcomer trips on: sinusoidal positions on the tokens' scale (older checkpoints kept at
theirs), the best checkpoint by the metric the task's users choose, options refused when the
recipe is read rather than minutes into a run."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cli.main import main
from sbtrain import checkpoint
from sbtrain.checkpoint import load_model
from sbtrain.config import SINUSOID_SCALE, DecoderConfig
from sbtrain.model import TransformerLM, sinusoids
from sbtrain.tasks import load_recipe
from tests.conftest import DEBUG_RECIPE, ROOT, one_error_line, read_jsonl

LISTOPS = ROOT / "recipes" / "lra" / "listops-cpu.yaml"


def train(token_folder, save_dir, *overrides) -> int:
    args = ["train", str(DEBUG_RECIPE), f"data.dir={token_folder}", f"train.save_dir={save_dir}",
            "train.tensorboard=false", *overrides]  # fmt: skip
    return main(args)


def test_the_sinusoid_table_starts_on_the_token_embeddings_scale():
    cfg = DecoderConfig(n_layers=1, n_heads=2, d_model=64, d_ff=64, positions="sinusoidal")
    model = TransformerLM(cfg, 100, 64)
    table_rms = float(model.pos_table.pow(2).mean().sqrt())
    token_rms = float(model.tok_emb.weight.pow(2).mean().sqrt())
    assert table_rms == pytest.approx(0.02, rel=0.02)  # 0.02 * sqrt(2) * (1 / sqrt(2))
    assert table_rms == pytest.approx(token_rms, rel=0.1)
    assert pytest.approx(0.02 * math.sqrt(2)) == SINUSOID_SCALE


def test_an_older_sinusoidal_checkpoint_keeps_its_amplitude(token_folder, tmp_path):
    """A recipe stored before sinusoid_scale existed scores with the amplitude-1 table it was
    trained with: the loaded model equals one built by hand with scale 1."""
    assert train(token_folder, tmp_path, "model.positions=sinusoidal", "train.max_updates=3") == 0
    path = tmp_path / "checkpoint_last.pt"
    state = checkpoint.load(path)
    assert state["recipe"]["model"]["sinusoid_scale"] == pytest.approx(SINUSOID_SCALE)
    del state["recipe"]["model"]["sinusoid_scale"]
    checkpoint.save(state, path)
    model, recipe, *_ = load_model(path, torch.device("cpu"))
    assert recipe.model.sinusoid_scale == 1.0
    torch.testing.assert_close(model.pos_table, sinusoids(64, 64, 1.0))
    assert model.pos_table.abs().max() == pytest.approx(1.0, abs=1e-3)


def test_a_classifier_keeps_its_best_checkpoint_by_accuracy_and_logs_examples(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "bin"
    tiny = ["listops.train=256", "listops.valid=64", "listops.test=16", "listops.min_tokens=8",
            "listops.max_tokens=32", "listops.max_depth=3", f"data.dir={data}",
            "data.tokens_per_sample=32"]  # fmt: skip
    assert main(["preprocess", str(LISTOPS), *tiny]) == 0
    run = [str(LISTOPS), *tiny, f"train.save_dir={tmp_path / 'run'}", "train.batch_size=16",
           "train.validate_interval=4", "train.log_interval=4", "model.d_model=32"]  # fmt: skip
    capsys.readouterr()
    assert main(["train", *run, "train.max_updates=16", "train.tensorboard=true"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_best.pt and patience follow the valid accuracy" in out
    assert "best valid accuracy" in out
    train_log = read_jsonl(tmp_path / "run" / "train.jsonl")
    assert all("eps" in r and "wps" not in r and "wpb" not in r for r in train_log)
    assert "| eps " in out and "| bsz 16 |" in out  # examples/s; examples per update
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/eps", "train/bsz", "valid/accuracy"} <= tags and "train/wps" not in tags
    valid = read_jsonl(tmp_path / "run" / "valid.jsonl")
    best = max(r["accuracy"] for r in valid)
    assert valid[-1]["best_accuracy"] == best
    state = checkpoint.load(tmp_path / "run" / "checkpoint_best.pt")
    assert (
        state["counters"]["best_valid"] == best and state["counters"]["best_metric"] == "accuracy"
    )
    first_best = next(r["update"] for r in valid if r["accuracy"] == best)
    assert state["counters"]["updates"] == first_best
    # resumed: the best value goes on from the checkpoint, not anew
    assert main(["train", *run, "train.max_updates=20"]) == 0
    assert "(the checkpoint followed another" not in capsys.readouterr().out
    valid = read_jsonl(tmp_path / "run" / "valid.jsonl")
    assert valid[-1]["best_accuracy"] == max(r["accuracy"] for r in valid)


def test_accuracy_is_refused_for_a_task_that_counts_no_hits(token_folder, tmp_path, capsys):
    assert train(token_folder, tmp_path, "train.best_checkpoint_metric=accuracy") == 2
    assert "the lm task counts no correct predictions; use loss" in one_error_line(capsys)


@pytest.mark.parametrize(
    "attention, message",
    [
        ("{kind: lsh, bucket_size: 8}", "lsh has no fused kernel"),
        ("{kind: full}", "full has no fused kernel"),
        ("{kind: performer, n_features: 16, features: favor++}", "favor++ feature map"),
        ("{kind: scatterbrain, window: 24, n_features: 16}", "window 24 is not a multiple of 16"),
        ("{kind: scatterbrain, sparse: lsh, n_features: 16}", "sparse=lsh has no fused kernel"),
    ],
)
def test_fused_without_a_kernel_is_refused_when_the_recipe_is_read(tmp_path, capsys, attention,
                                                                   message):  # fmt: skip
    overrides = [f"model.attention={attention}", "train.attention_impl=fused"]
    with pytest.raises(Exception, match=re.escape(message)):
        load_recipe(DEBUG_RECIPE, overrides)
    assert main(["train", str(DEBUG_RECIPE), *overrides, f"train.save_dir={tmp_path}"]) == 2
    assert message in one_error_line(capsys)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_fused_is_refused_for_a_classifier(capsys):
    args = [str(LISTOPS), "train.attention_impl=fused",
            "model.attention={kind: performer, n_features: 16}"]  # fmt: skip
    assert main(["train", *args]) == 2
    assert "causal only" in one_error_line(capsys)


def test_eval_and_generate_refuse_a_fused_swap_without_a_kernel(trained_debug, capsys):
    ckpt = str(trained_debug / "checkpoint_best.pt")
    swap = ["--attention", "lsh", "bucket_size=8", "--attention-impl", "fused"]
    assert main(["eval-ppl", ckpt, *swap]) == 2
    assert "lsh has no fused kernel" in one_error_line(capsys)
    assert main(["generate", ckpt, "--prompt", "w1", *swap]) == 2
    assert "lsh has no fused kernel" in one_error_line(capsys)


def test_fused_off_cuda_is_refused_before_training(token_folder, tmp_path, capsys, monkeypatch):
    import sbtrain.attention.triton_kernels as kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    overrides = ["model.attention={kind: performer, n_features: 16}", "train.attention_impl=fused"]
    assert train(token_folder, tmp_path, *overrides) == 2
    assert "the fused kernels need a CUDA device" in one_error_line(capsys)
    assert not (tmp_path / "checkpoint_last.pt").exists()
