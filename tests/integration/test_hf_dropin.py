"""sbtrain's attention kinds dropped into Hugging Face causal LMs (sbtrain.dropin) and
`sbtrain eval-ppl hf:PATH`.

The models are tiny GPT-2 (learned positions) and Llama (rotary positions, grouped-query heads)
made here from a config with random weights (std 0.3, so attention is far from uniform) and saved
with save_pretrained, with a byte-level BPE tokenizer fitted on the test corpus. The truths are
the models with their own attention (transformers' eager softmax) and NLLs computed here from
their logits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip(
    "transformers", reason="needs the hf extra: pip install -e '.[hf]'"
)

from cli.main import main  # noqa: E402
from sbtrain import dropin  # noqa: E402
from sbtrain.errors import UserError  # noqa: E402
from sbtrain.tokenizer import BpeTokenizer  # noqa: E402
from tests.conftest import DEBUG_RECIPE, one_error_line  # noqa: E402

CONTEXT = 64  # positions of the tiny models
VOCAB = 300  # embedding rows (the tokenizer has at most this many)
SPECS = {  # every kind, at sizes that approximate at CONTEXT tokens
    "full": {"kind": "full"},
    "local": {"kind": "local", "window": 8},
    "performer": {"kind": "performer", "n_features": 16},
    "lsh": {"kind": "lsh", "n_hashes": 2, "bucket_size": 8},
    "scatterbrain": {"kind": "scatterbrain", "window": 8, "n_features": 16},
    "scatterbrain-lsh": {
        "kind": "scatterbrain",
        "sparse": "local+lsh",
        "window": 8,
        "n_features": 16,
        "n_hashes": 2,
        "bucket_size": 8,
    },
}
RANDOM = ("performer", "lsh", "scatterbrain", "scatterbrain-lsh")


def tiny_config(family: str):
    if family.startswith("gpt2"):  # gpt2-scaled: softmax temperature 1 / (sqrt(D) * (layer + 1))
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=2,
            eos_token_id=2,
            scale_attn_by_inverse_layer_idx=family == "gpt2-scaled",
        )
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )


@pytest.fixture(scope="module")
def models(word_corpus, tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a tiny random model with its tokenizer (save_pretrained)."""
    raw, _ = word_corpus
    lines = (raw / "wiki.train.raw").read_text(encoding="utf-8").split("\n")
    bpe = BpeTokenizer.fit(lines, vocab_size=VOCAB)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe.tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    root = tmp_path_factory.mktemp("hf-models")
    folders = {}
    for family in ("gpt2", "gpt2-scaled", "llama"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        folders[family] = root / family
        model.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


def original(folder: Path):
    """The model with its own attention: transformers' eager softmax."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def kernels(model) -> list[torch.nn.Module]:
    return [m.sbtrain_kernel for m in model.modules() if hasattr(m, "sbtrain_kernel")]


def draws(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".sbtrain_kernel." in k}


def tokens(batch: int = 2, length: int = CONTEXT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


# ---------------------------------------------------------------------------------------------
# the drop-in


@pytest.mark.parametrize("family", ["gpt2", "gpt2-scaled", "llama"])
def test_exact_swaps_equal_the_original(family, models):
    x = tokens()
    expected = logits(original(models[family]), x)
    assert expected.std() > 0.3  # far from uniform: a wrong scale or mask would show
    exact = {  # kinds whose support covers every earlier token at CONTEXT tokens
        "full": {"kind": "full"},
        "local": {"kind": "local", "window": CONTEXT},
        "scatterbrain": {"kind": "scatterbrain", "window": CONTEXT, "n_features": 16},
    }
    for spec in exact.values():
        model = dropin.load(models[family], spec)
        assert len(kernels(model)) == 2  # one kernel per layer: the swap is in place
        assert_close(logits(model, x), expected)
    # and an approximating window is not exact (the comparison above can fail)
    narrow = logits(dropin.load(models[family], SPECS["local"]), x)
    assert (narrow - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("name", SPECS)
def test_every_kind_is_causal(family, name, models):
    model = dropin.load(models[family], SPECS[name])
    x = tokens(batch=1)
    cut = 40
    changed = x.clone()
    changed[:, cut:] = (changed[:, cut:] + 7) % VOCAB
    a, b = logits(model, x), logits(model, changed)
    assert_close(b[:, :cut], a[:, :cut])
    assert (b[:, cut:] - a[:, cut:]).abs().max() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("name", RANDOM)
def test_draws_are_per_layer_stable_and_saved(family, name, models, tmp_path):
    model = dropin.load(models[family], SPECS[name])
    drawn = draws(model)
    first, second = (
        {k.split(".sbtrain_kernel.")[1]: v for k, v in drawn.items() if f".{i}." in k}
        for i in (0, 1)
    )
    assert first.keys() == second.keys() and first
    assert all(not torch.equal(first[k], second[k]) for k in first)  # each layer its own draw
    x = tokens()
    once = logits(model, x)
    assert_close(logits(model, x), once, rel=0)  # drawn once: a second call is the same
    assert all(torch.equal(v, draws(model)[k]) for k, v in drawn.items())
    # the same root seed draws the same; another root seed draws anew
    assert all(
        torch.equal(v, draws(dropin.load(models[family], SPECS[name]))[k]) for k, v in drawn.items()
    )
    other = draws(dropin.load(models[family], {**SPECS[name], "seed": 5}))
    assert all(not torch.equal(v, other[k]) for k, v in drawn.items())

    # saved with the model: reloading restores the saved draws (not fresh ones), and the
    # logits with them
    for kernel in kernels(model):
        kernel.redraw(123)  # no seed would draw these: only the saved file holds them
    changed = logits(model, x)
    assert (changed - once).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "swapped")
    again = dropin.load(tmp_path / "swapped")
    assert all(torch.equal(v, draws(again)[k]) for k, v in draws(model).items())
    assert_close(logits(again, x), changed, rel=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kernels_are_causal_whatever_the_config_says(family, models):
    dropin.register()
    config = transformers.AutoConfig.from_pretrained(models[family])
    config.sbtrain_attention = {"window": 8, "causal": False}  # not through check_spec
    model = transformers.AutoModelForCausalLM.from_pretrained(
        models[family], config=config, attn_implementation="sbtrain_local"
    ).eval()
    x = tokens(batch=1)
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 7) % VOCAB
    assert_close(logits(model, changed)[:, :40], logits(model, x)[:, :40])
    assert all(kernel.causal for kernel in kernels(model))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformers_loader_picks_the_registered_kinds(family, models):
    dropin.register()
    spec = SPECS["scatterbrain"]
    config = transformers.AutoConfig.from_pretrained(models[family])
    config.sbtrain_attention = {k: v for k, v in spec.items() if k != "kind"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        models[family], config=config, attn_implementation="sbtrain_scatterbrain"
    ).eval()
    x = tokens()
    got = logits(model, x)  # kernels are built on the first call
    assert len(kernels(model)) == 2
    assert_close(got, logits(dropin.load(models[family], spec), x), rel=0)
    # dropin.swap on a loaded model: the same kernels and draws
    swapped = dropin.swap(original(models[family]), **spec)
    assert_close(logits(swapped, x), got, rel=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_right_padding_is_served_left_padding_refused(family, models):
    model = dropin.load(models[family], SPECS["scatterbrain"])
    x = tokens(batch=2, length=20)
    mask = torch.ones_like(x)
    mask[1, 14:] = 0  # the second sequence has 14 real tokens
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask).logits
    alone = logits(model, x[1:, :14])
    assert_close(padded[1, :14], alone[0])
    assert_close(padded[0], logits(model, x[:1])[0])
    left = torch.ones_like(x)
    left[1, :6] = 0
    with pytest.raises(ValueError, match="only right padding") as error, torch.no_grad():
        model(input_ids=x, attention_mask=left)
    assert "\n" not in str(error.value)


def test_key_value_cache_and_dropout_are_refused(models):
    model = dropin.load(models["gpt2"], SPECS["local"])
    model.config.use_cache = True
    with pytest.raises(ValueError, match="use_cache=False"), torch.no_grad():
        cache = model(input_ids=tokens(length=8), use_cache=True).past_key_values
        model(input_ids=tokens(length=1), cache=cache, use_cache=True)
    model.train()
    model.config.attn_pdrop = 0.1
    for module in model.modules():
        if hasattr(module, "attn_dropout"):
            module.attn_dropout.p = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=tokens(length=8))


# ---------------------------------------------------------------------------------------------
# sbtrain eval-ppl hf:PATH


@pytest.fixture(scope="module")
def hf_split(models, word_corpus, tmp_path_factory) -> Path:
    """The test corpus preprocessed with the tiny models' tokenizer (data.tokenizer: hf:...)."""
    raw, _ = word_corpus
    data = tmp_path_factory.mktemp("hf-bin") / "bin"
    args = [
        "preprocess",
        str(DEBUG_RECIPE),
        f"data.raw={raw}",
        f"data.dir={data}",
        f"data.tokenizer=hf:{models['gpt2']}",
    ]
    assert main(args) == 0
    return data


@pytest.fixture(scope="module")
def bpe_split(word_corpus, tmp_path_factory) -> Path:
    """The test corpus preprocessed with sbtrain's own BPE, of fewer ids than the models read."""
    raw, _ = word_corpus
    data = tmp_path_factory.mktemp("bpe-bin") / "bin"
    args = ["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}",
            "data.tokenizer=bpe", "data.vocab_size=260"]  # fmt: skip
    assert main(args) == 0
    return data


def direct_nll(model, folder: Path, text: str) -> tuple[float, int]:
    """Summed NLL and tokens of `text` computed from the model's logits: each line's tokens and
    the newline's token, after one newline token; blocks of CONTEXT inputs."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    (eol,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stream = [eol]
    for line in text.split("\n")[:-1]:
        stream += [*tokenizer(line, add_special_tokens=False)["input_ids"], eol]
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, CONTEXT):
        block = torch.tensor(stream[start : start + CONTEXT + 1])
        log_p = torch.log_softmax(logits(model, block[None, :-1])[0].double(), -1)
        total -= log_p.gather(1, block[1:, None]).sum().item()
        count += len(block) - 1
    return total, count


def eval_json(capsys, *args: str) -> dict:
    assert main(["eval-ppl", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eval_ppl_of_a_hf_model(family, models, hf_split, word_corpus, capsys):
    raw, _ = word_corpus
    text = (raw / "wiki.test.raw").read_text(encoding="utf-8")
    folder = models[family]
    nll, count = direct_nll(original(folder), folder, text)
    own = eval_json(capsys, f"hf:{folder}", "--data", str(hf_split))
    assert own["tokens"] == count > 2 * CONTEXT
    assert own["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert own["tokens_per_sample"] == CONTEXT and own["checkpoint"] == f"hf:{folder}"
    assert own["positions"] == ("learned" if family == "gpt2" else "rope")
    context = eval_json(
        capsys, f"hf:{folder}", "--data", str(hf_split), "--context-window", "16",
        "--by-position", "16",
    )  # fmt: skip
    assert context["tokens"] == count  # context tokens are seen, not scored again
    assert sum(b["tokens"] for b in context["by_position"]) == count
    assert context["by_position"][0]["start"] == 0 and context["by_position"][-1]["end"] == CONTEXT
    assert context["ppl"] != own["ppl"]

    wide = eval_json(
        capsys, f"hf:{folder}", "--data", str(hf_split), "--attention", "local", f"window={CONTEXT}"
    )
    assert wide["ppl"] == pytest.approx(own["ppl"], rel=1e-5) and wide["attention"] == "local"

    spec = SPECS["scatterbrain"]
    swapped = eval_json(
        capsys,
        f"hf:{folder}",
        "--data",
        str(hf_split),
        "--attention",
        "scatterbrain",
        "window=8",
        "n_features=16",
    )
    nll, _ = direct_nll(dropin.swap(original(folder), **spec), folder, text)
    assert swapped["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert abs(swapped["ppl"] / own["ppl"] - 1) > 1e-3  # the swap does change the model


def test_eval_ppl_of_an_exported_sbtrain_model_equals_native(
    word_corpus, bpe_split, tmp_path, capsys
):
    from tests.integration.test_export import make_checkpoint

    _, data = word_corpus
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), str(out)]) == 0
    # sbtrain loads the folder with its own classes: no code of the folder runs, not even a
    # module its config.json maps the model to (checked first: transformers keeps a class it
    # loaded once for the process)
    tampered = shutil.copytree(out, tmp_path / "tampered")
    marker = tmp_path / "ran"
    (tampered / "other.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('the folder code ran')\n"
    )
    config = json.loads((tampered / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "other.Model"
    (tampered / "config.json").write_text(json.dumps(config))
    with open(tampered / "modeling_sbtrain.py", "a", encoding="utf-8") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    common = ["--data", str(data), "--attention-impl", "pytorch"]
    hf = eval_json(capsys, f"hf:{tampered}", *common)
    assert hf["ppl"] == pytest.approx(eval_json(capsys, str(ckpt), *common)["ppl"], rel=1e-6)
    assert not marker.exists()

    for attention in (
        [],
        ["--attention", "performer", "n_features=16"],
        ["--attention", "lsh", "n_hashes=2", "bucket_size=8", "n_buckets=4"],
        ["--attention", "scatterbrain", "window=8", "n_features=16"],
    ):
        common = ["--data", str(data), "--attention-impl", "pytorch", *attention]
        native = eval_json(capsys, str(ckpt), *common)
        hf = eval_json(capsys, f"hf:{out}", *common)
        assert hf["tokens"] == native["tokens"]
        assert hf["ppl"] == pytest.approx(native["ppl"], rel=1e-6)  # the same draws
        assert hf["attention"] == native["attention"]

    # a split of another tokenizer is refused, though its ids fit the model's vocabulary
    assert json.loads((data / "meta.json").read_text())["vocab_size"] > 260
    assert main(["eval-ppl", f"hf:{out}", "--data", str(bpe_split)]) == 2
    assert "bpe ids of a vocabulary of 260" in one_error_line(capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["sbtrain_tokenizer"] == "word"
    (out / "config.json").write_text(json.dumps({**config, "sbtrain_tokenizer": "sentencepiece"}))
    assert main(["eval-ppl", f"hf:{out}", "--data", str(data)]) == 2  # of the same size
    assert "a sentencepiece vocabulary" in one_error_line(capsys)


def test_eval_ppl_hf_bad_input(models, hf_split, bpe_split, word_corpus, tmp_path, capsys):
    _, words = word_corpus
    missing = tmp_path / "nothing"
    assert main(["eval-ppl", f"hf:{missing}", "--data", str(hf_split)]) == 2
    assert "no such folder" in one_error_line(capsys)
    assert main(["eval-ppl", f"hf:{models['gpt2']}"]) == 2
    assert "--data" in one_error_line(capsys)
    bert = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(bert)
    assert main(["eval-ppl", f"hf:{bert}", "--data", str(hf_split)]) == 2
    assert "not a causal language model" in one_error_line(capsys)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "no-such-model"}')
    assert main(["eval-ppl", f"hf:{tmp_path / 'odd'}", "--data", str(hf_split)]) == 2
    assert "not a causal language model" in one_error_line(capsys)
    assert main(["eval-ppl", f"hf:{tmp_path / 'odd'}", "--data", str(hf_split),
                 "--attention", "local", "window=4"]) == 2  # fmt: skip
    assert "not a causal language model" in one_error_line(capsys)
    args = ["eval-ppl", f"hf:{models['gpt2']}", "--data", str(hf_split)]
    assert main([*args, "--attention", "performer", "window=8"]) == 2
    assert "does not take window" in one_error_line(capsys)
    assert main([*args, "--attention", "local", "window=8", "causal=false"]) == 2
    assert "causal is not an option" in one_error_line(capsys)
    assert main([*args, "--attention", "local", "window=8", "seed=3"]) == 2  # nothing to seed
    assert "no random draws" in one_error_line(capsys)
    assert main([*args, "--tokens-per-sample", str(CONTEXT + 1)]) == 2
    assert "learned positions" in one_error_line(capsys)
    assert main(["eval-ppl", f"hf:{models['gpt2']}", "--data", str(words)]) == 2  # word ids
    assert "sbtrain's word tokenizer" in one_error_line(capsys)
    assert json.loads((bpe_split / "meta.json").read_text())["vocab_size"] <= VOCAB
    assert main(["eval-ppl", f"hf:{models['gpt2']}", "--data", str(bpe_split)]) == 2  # fits
    assert "sbtrain's bpe tokenizer" in one_error_line(capsys)
    other = tmp_path / "other-bin"  # the same ids, said to come from another tokenizer
    shutil.copytree(hf_split, other)
    lines = ["a b c", "d e f g"] * 50
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=BpeTokenizer.fit(lines, vocab_size=270).tokenizer, eos_token="</s>"
    )
    tokenizer.save_pretrained(other / "hf-tokenizer")
    assert main(["eval-ppl", f"hf:{models['gpt2']}", "--data", str(other)]) == 2
    assert "another tokenizer" in one_error_line(capsys)


def test_unloadable_weights_and_unknown_context_are_one_line(
    models, hf_split, tmp_path, capsys, monkeypatch
):
    args = ["--data", str(hf_split)]
    wider = shutil.copytree(models["gpt2"], tmp_path / "wider")  # weights of other shapes
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "n_embd": 48}))
    assert main(["eval-ppl", f"hf:{wider}", *args]) == 2
    assert "not a causal language model" in one_error_line(capsys)
    corrupt = shutil.copytree(models["gpt2"], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors" * 8)
    assert main(["eval-ppl", f"hf:{corrupt}", *args]) == 2
    assert "not a causal language model" in one_error_line(capsys)

    # a config naming no context length (neither n_positions nor max_position_embeddings)
    config = type("Config", (), {"model_type": "mystery", "_attn_implementation": "sdpa"})
    monkeypatch.setattr(dropin, "load", lambda *a: type("LM", (), {"config": config})())
    assert main(["eval-ppl", f"hf:{models['gpt2']}", *args]) == 2
    assert "give --tokens-per-sample" in one_error_line(capsys)


def test_default_blocks_of_a_rotary_model_are_capped(models, hf_split, tmp_path, capsys):
    long = shutil.copytree(models["llama"], tmp_path / "long")  # Llama-3's context length
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 131072}))
    result = eval_json(capsys, f"hf:{long}", "--data", str(hf_split))
    assert result["tokens_per_sample"] == 2048 == dropin.DEFAULT_LENGTH
    assert result["trained_tokens_per_sample"] == 131072
    given = eval_json(capsys, f"hf:{long}", "--data", str(hf_split), "--tokens-per-sample", "4096")
    assert given["tokens_per_sample"] == 4096  # past the default, asked for: allowed


def test_transformers_missing_says_what_to_install(models, hf_split, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    assert main(["eval-ppl", f"hf:{models['gpt2']}", "--data", str(hf_split)]) == 2
    assert "pip install 'sbtrain[hf]'" in one_error_line(capsys)


def test_hf_tokenizer_ends_lines_with_newline_or_end_of_sequence(models, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    from sbtrain.tokenizer import HFTokenizer, tokenizer_from_file

    bpe = HFTokenizer.from_file(models["gpt2"])  # byte level: a newline is one token
    # what binarization's worker processes load: the copy saved in the data folder
    copy = tokenizer_from_file(bpe.save(tmp_path / "data"))
    assert isinstance(copy, HFTokenizer) and copy.vocabulary() == bpe.vocabulary()
    assert bpe.encode("\n") == [bpe.eol_id] and bpe.eol_id != bpe.tokenizer.eos_token_id
    words = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # a newline is no token at all
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    fast.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(UserError, match="no end-of-sequence token"):
        HFTokenizer.from_file(tmp_path / "no-eos")
    fast.eos_token = "</s>"
    fast.save_pretrained(tmp_path / "words")
    tokenizer = HFTokenizer.from_file(tmp_path / "words")
    assert tokenizer.eol_id == 1
    assert tokenizer.encode_block("a b\n\nb x\n").ids.tolist() == [2, 3, 1, 1, 3, 0, 1]
