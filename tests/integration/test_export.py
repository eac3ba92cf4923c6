"""`sbtrain export`: the folder transformers loads computes what sbtrain computes.

Checkpoints are debug-size models of every attention kind with random weights (std 0.3, so the
logits are far from uniform), written in-process; the truth is sbtrain's own model loaded from the
checkpoint (logits) and `sbtrain generate --temperature 0` (greedy tokens, decoded with sbtrain's
caches: another code path than the exported full forward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import
os.environ["TRANSFORMERS_OFFLINE"] = "1"
HINT = "needs the hf extra: pip install -e '.[hf]'"
transformers = pytest.importorskip("transformers", reason=HINT)

from cli.main import main  # noqa: E402
from sbtrain import checkpoint, generate  # noqa: E402
from sbtrain import export as export_module  # noqa: E402
from sbtrain.checkpoint import load_model  # noqa: E402
from sbtrain.errors import UserError  # noqa: E402
from sbtrain.tasks import build_model, load_recipe  # noqa: E402
from sbtrain.tokenizer import load_tokenizer  # noqa: E402
from tests.conftest import (  # noqa: E402
    DEBUG_RECIPE,
    WIKI_LEADS,
    one_error_line,
    write_corpus,
)

LSH = "n_hashes: 2, bucket_size: 8, n_buckets: 4"
MODELS = {  # name: recipe overrides (debug size: head_dim 16, 64 positions)
    "full": ["model.positions=sinusoidal"],
    "local": ["model.attention={kind: local, window: 16}"],
    "performer-adaptive": [
        "model.attention={kind: performer, n_features: 16}",
        "model.output=adaptive",
        "model.adaptive_cutoffs=[20, 100]",
    ],
    "lsh-rope": [f"model.attention={{kind: lsh, {LSH}}}", "model.positions=rope"],
    "scatterbrain-local": [
        "model.attention={kind: scatterbrain, sparse: local, window: 16, n_features: 16}"
    ],
    "scatterbrain-local+lsh-rope": [
        "model.attention={kind: scatterbrain, sparse: local+lsh, window: 8, n_features: 16, "
        f"{LSH}}}",
        "model.positions=rope",
    ],
}
PROMPT = "w1 w2 w0 w5 w3 w1 w9 w2"


def make_checkpoint(data: Path, path: Path, overrides: list[str]) -> Path:
    """A checkpoint of the debug recipe with `overrides` and random weights (std 0.3)."""
    recipe = load_recipe(DEBUG_RECIPE, [f"data.dir={data}", "model.dropout=0.0", *overrides])
    vocab = load_tokenizer(data).vocab_size
    model = build_model(recipe, vocab_size=vocab)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    state = {"model": model.state_dict(), "recipe": recipe.to_dict(), "vocab_size": vocab,
             "model_args": {"vocab_size": vocab}}  # fmt: skip
    checkpoint.save(state, path)
    return path


def load_exported(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return model.eval(), tokenizer


def assert_greedy_equal(model, tokenizer, ckpt: Path, data: Path, prompt: str) -> None:
    """greedy generate() == sbtrain generate --temperature 0 (which decodes with its caches):
    the tokens and each its log-probability (random weights repeat tokens; these numbers do not)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    sampled = generate.main(str(ckpt), prompt, max_tokens=12, temperature=0, data_dir=str(data))
    with torch.no_grad():
        greedy = model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = greedy.sequences[0, ids.shape[1] :].tolist()
    assert tokens == sampled["tokens"]
    chosen = [float(step[0, t]) for step, t in zip(greedy.scores, tokens)]
    assert chosen == pytest.approx(sampled["logprobs"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_exported_model_equals_sbtrain(name, word_corpus, tmp_path):
    _, data = word_corpus
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", MODELS[name])
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    model, tokenizer = load_exported(out)
    ours, *_ = load_model(ckpt, torch.device("cpu"), attention_impl="pytorch")

    tokens = torch.randint(0, ours.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.log_probs(ours(tokens))
        got = model(tokens).logits
    assert expected.std() > 0.5  # far from uniform: a wrong weight or buffer would show
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    assert_greedy_equal(model, tokenizer, ckpt, data, PROMPT)


def test_tokenizer_maps_text_to_sbtrain_ids(word_corpus, tmp_path):
    raw, data = word_corpus
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(data)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    lines = (raw / "wiki.valid.raw").read_text(encoding="utf-8").split("\n")[:-1]
    text = "\n".join(lines) + "\n"
    # binarization: every line's ids, then the end-of-line token (valid has unknown words too)
    stream = [i for line in lines for i in (*ours.encode(line), ours.eol_id)]
    assert ours.unk_id in stream
    assert theirs(text, add_special_tokens=False)["input_ids"] == stream
    # the default (special tokens added) puts an end-of-line first, as sbtrain generate does
    assert theirs("w1  w2\tw3 nosuchword")["input_ids"] == [
        ours.eol_id,
        *ours.encode("w1 w2 w3 nosuchword"),
    ]
    assert theirs.decode(stream[:5]).split() == ours.decode(stream[:5]).split()


# Text for the sentencepiece models to learn (punctuation, digits, accents) ...
VARIED = [
    " = Valkyria Chronicles III = ",
    " The game began development in 2010 , carrying over 1,024 units ( 3.5 % ) .",
    "Accents : café , Zürich , naïve — and « quotes » ; 'single' and \"double\" !?",
]
# ... and text to map with both: whitespace runs and kinds, NFKC rewrites (ligature, fraction,
# full-width letter), characters never seen (unknown), literal names of special pieces, the
# whitespace mark "▁" itself, empty and blank lines
TEXTS = [
    "",
    " ",
    "w1 w2 w3",
    "  Tabs\tand  double  spaces ,\ta no\u00a0break and a\u2009thin one ; CRLF ends\r",
    "ﬁnal ½ Ａrticle 2010-2024 : 3.14159 + 42 = 45.14159 ... ?!",
    "unknown : 中文 🙂 ß Ω ж ; a </s> <unk>b <s> <pad> and ⁇ ",
    "\u2581 lower block \u2581\u2581 twice",
    "\n".join(VARIED) + "\n\n \n w5 w6\n",
]


def preprocess_sentencepiece(root: Path, model_type: str) -> Path:
    """A folder preprocessed with a sentencepiece model (unigram or BPE) of ~300 pieces, fitted on
    `write_corpus` text and VARIED."""
    raw = write_corpus(root / "raw")
    train = raw / "wiki.train.raw"
    train.write_text(train.read_text(encoding="utf-8") + "\n".join(VARIED * 20) + "\n")
    data = root / "bin"
    args = ["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}",
            "data.tokenizer=sentencepiece", "data.vocab_size=300",
            f"data.spm_model_type={model_type}"]  # fmt: skip
    assert main(args) == 0
    return data


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sentencepiece_data(request, tmp_path_factory) -> Path:
    return preprocess_sentencepiece(tmp_path_factory.mktemp(f"spm-{request.param}"), request.param)


def test_sentencepiece_tokenizer_maps_text_to_sbtrain_ids(sentencepiece_data, tmp_path):
    """The exported tokenizer.json (no sentencepiece behind it) gives sbtrain's ids: each line
    encoded by sentencepiece, then the end-of-line token, as binarization does."""
    data = sentencepiece_data
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(data)
    assert ours.kind == "sentencepiece"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert theirs.eos_token_id == theirs.bos_token_id == ours.eol_id
    streams = []
    for text in TEXTS:
        lines = text.split("\n")
        stream = [i for line in lines for i in (ours.eol_id, *ours.encode(line))][1:]
        streams.append(stream)
        assert theirs(text, add_special_tokens=False)["input_ids"] == stream, text
        assert theirs(text)["input_ids"] == [ours.eol_id, *stream]
    assert streams[0] == streams[1] == []
    every = [i for stream in streams for i in stream]
    assert ours.unk_id in every and ours.eol_id in every
    assert every.count(ours.eol_id) == sum(t.count("\n") for t in TEXTS)  # not "</s>" in text
    assert len(set(every)) > 60  # many pieces, not a few fallbacks
    for stream in streams:  # decoding: sentencepiece's text of each line, joined by newlines
        assert theirs.decode(stream) == ours.decode(stream)


def test_sentencepiece_export_logits_and_generate(sentencepiece_data, tmp_path):
    data = sentencepiece_data
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", MODELS["lsh-rope"])
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    model, tokenizer = load_exported(tmp_path / "hf")
    ours, *_ = load_model(ckpt, torch.device("cpu"), attention_impl="pytorch")
    ids = tokenizer(VARIED[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ours.log_probs(ours(ids))
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert_greedy_equal(model, tokenizer, ckpt, data, VARIED[2])


@pytest.mark.skipif(not WIKI_LEADS.is_dir(), reason=f"wiki-leads corpus not found at {WIKI_LEADS}")
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_tokenizer_on_wikipedia(model_type):
    """Real text, a real-size vocabulary: every line of wiki-leads' validation split."""
    from sbtrain.export import sentencepiece_fast
    from sbtrain.tokenizer import SentencePieceTokenizer

    train = (WIKI_LEADS / "wiki.train.raw").read_text(encoding="utf-8").split("\n")
    ours = SentencePieceTokenizer.fit(train[:3000], vocab_size=2000, model_type=model_type)
    theirs, _ = sentencepiece_fast(ours)
    text = (WIKI_LEADS / "wiki.valid.raw").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert len(lines) > 1000
    stream = [i for line in lines for i in (ours.eol_id, *ours.encode(line))][1:]
    assert theirs.encode(text, add_special_tokens=False).ids == stream


def test_sentencepiece_options_without_an_exact_conversion_are_refused():
    import io

    import sentencepiece

    from sbtrain.export import sentencepiece_fast
    from sbtrain.tokenizer import SentencePieceTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(VARIED * 20), model_writer=model, vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, user_defined_symbols=["<sep>"],
        minloglevel=2,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"\(byte fallback, user-defined or byte pieces\);"):
        sentencepiece_fast(SentencePieceTokenizer(model.getvalue()))


def test_export_refuses_to_overwrite_and_bad_checkpoints(word_corpus, tmp_path, capsys):
    _, data = word_corpus
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(ckpt), str(out)]) == 2
    assert "--force" in one_error_line(capsys)
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["export", str(ckpt), str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), str(tmp_path / "other")]) == 2
    assert "bad.pt" in one_error_line(capsys)
    assert not (tmp_path / "other").exists()


def test_a_refused_tokenizer_leaves_an_existing_folder_intact(tmp_path, capsys, monkeypatch):
    import sentencepiece

    raw = write_corpus(tmp_path / "raw")
    sentencepiece.SentencePieceTrainer.train(
        input=str(raw / "wiki.train.raw"), model_prefix=str(tmp_path / "fallback"),
        vocab_size=300, hard_vocab_limit=False, byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    data = tmp_path / "bin"
    args = ["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}",
            f"data.tokenizer={tmp_path / 'fallback.model'}"]  # fmt: skip
    assert main(args) == 0
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    out = tmp_path / "out" / "hf"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(ckpt), str(out), "--force"]) == 2
    assert "--no-tokenizer" in one_error_line(capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]  # nothing left beside it
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep"

    def full_disk(folder, weights):
        (folder / "model.safetensors").write_bytes(b"half")
        raise UserError("no space left on the device")

    with monkeypatch.context() as patch:  # a failure while writing: the same
        patch.setattr(export_module, "write_weights", full_disk)
        assert main(["export", str(ckpt), str(out), "--force", "--no-tokenizer"]) == 2
    assert "no space left" in one_error_line(capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["export", str(ckpt), str(out), "--force", "--no-tokenizer"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()
    assert not (out / "tokenizer.json").exists()
    (tmp_path / "plain").mkdir()  # the permissions of any new folder (not a private one)
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_checkpoint_of_an_hf_tokenizer_split_exports_without_it(word_corpus, tmp_path, capsys):
    from sbtrain.tokenizer import BpeTokenizer

    raw, _ = word_corpus
    lines = (raw / "wiki.train.raw").read_text(encoding="utf-8").split("\n")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=BpeTokenizer.fit(lines, vocab_size=280).tokenizer, eos_token="</s>"
    ).save_pretrained(tmp_path / "model-folder")
    data = tmp_path / "bin"
    args = ["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}",
            f"data.tokenizer=hf:{tmp_path / 'model-folder'}"]  # fmt: skip
    assert main(args) == 0
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    assert "--no-tokenizer" in one_error_line(capsys)
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 0


def test_export_without_safetensors_says_what_to_install(
    word_corpus, tmp_path, capsys, monkeypatch
):
    _, data = word_corpus
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", [])
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    assert "pip install 'sbtrain[hf]'" in one_error_line(capsys)


BLOCKED = """
import sys, json, torch
class Block:  # the exported folder must not need sbtrain
    def find_spec(self, name, path=None, target=None):
        if name == "sbtrain" or name.startswith("sbtrain."):
            raise ImportError("sbtrain is blocked")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = AutoTokenizer.from_pretrained(sys.argv[1])("w1 w2 w3")["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
print("\\nRESULT", json.dumps({"ids": ids, "logits": logits}))
"""


@pytest.mark.slow
def test_exported_folder_loads_without_sbtrain(word_corpus, tmp_path):
    _, data = word_corpus
    overrides = MODELS["scatterbrain-local+lsh-rope"]
    ckpt = make_checkpoint(data, tmp_path / "ck.pt", overrides)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # a fresh copy of the folder's code
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repository: sbtrain is not importable from the working dir
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.rpartition("RESULT ")[2])  # after transformers' own output
    ours, *_ = load_model(ckpt, torch.device("cpu"), attention_impl="pytorch")
    tokenizer = load_tokenizer(data)
    assert got["ids"] == [tokenizer.eol_id, *tokenizer.encode("w1 w2 w3")]
    with torch.no_grad():
        expected = ours.log_probs(ours(torch.tensor([got["ids"]])))[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["word", "sentencepiece", "bpe"])
def test_generate_encodes_a_multi_line_prompt_as_the_exported_tokenizer(kind, tmp_path):
    """`sbtrain generate` feeds the ids the exported tokenizer.json gives the same prompt
    (special tokens added: an end-of-line first), multi-line prompts included."""
    from tokenizers import Tokenizer

    from sbtrain.export import build_tokenizer
    from sbtrain.tasks import get_task

    raw = write_corpus(tmp_path / "raw")
    data = tmp_path / "bin"
    extra = [] if kind == "word" else [f"data.tokenizer={kind}", "data.vocab_size=300"]
    args = ["preprocess", str(DEBUG_RECIPE), f"data.raw={raw}", f"data.dir={data}", *extra]
    assert main(args) == 0
    ours = load_tokenizer(data)
    fast, _ = build_tokenizer(ours, 64)
    fast.save(str(tmp_path / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    task = get_task(load_recipe(DEBUG_RECIPE, [f"data.dir={data}"]))
    for prompt in ("w1 w2", "w1 w2\nw3  w4\n\nw5", "w7\n"):
        ids, hidden, _ = task.encode_prompt(prompt, None, ours.vocab_size)
        assert ids == theirs.encode(prompt).ids and hidden == 1
        assert ids.count(ours.eol_id) == 1 + prompt.count("\n")
