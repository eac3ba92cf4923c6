"""`sbtrain export`: a checkpoint as a folder Hugging Face transformers loads offline.

    export("checkpoints/wt103/checkpoint_best.pt", "exported/wt103")
    # then, without sbtrain:
    model = AutoModelForCausalLM.from_pretrained("exported/wt103", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("exported/wt103")

The folder holds config.json, model.safetensors, the tokenizer (tokenizer.json and its config)
and the model's code: sbtrain's own model and attention sources, copied with their imports made
relative (one source of truth: the exported model runs the code sbtrain runs), plus the two
transformers classes of sbtrain/hf/. transformers resolves a folder's `from .NAME import` lines
to files beside the model file, so the sources are copied flat.

The tokenizer maps a text to sbtrain's ids: each newline to the end-of-line token, as
binarization does, and (`add_special_tokens`, transformers' default) one end-of-line token first,
as `sbtrain generate` and every training stream start. Every kind becomes a tokenizer.json
(`tokenizers` alone, no sentencepiece needed to load it); for sentencepiece see
`sentencepiece_fast`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import sbtrain
from sbtrain.attention import RANDOM_KINDS
from sbtrain.checkpoint import load_model
from sbtrain.errors import UserError
from sbtrain.staging import staging
from sbtrain.tokenizer import HF_INSTALL, SPECIALS

PACKAGE = Path(sbtrain.__file__).parent
# file in the exported folder -> sbtrain source it is copied from
SOURCES = {
    "model.py": "model.py",
    "batch.py": "batch.py",
    "errors.py": "errors.py",
    "attention.py": "attention/__init__.py",
    **{
        f"{name}.py": f"attention/{name}.py"
        for name in ("common", "features", "full", "local", "lsh", "performer", "scatterbrain")
    },
    "dispatch.py": "attention/dispatch.py",
    "context_parallel.py": "attention/context_parallel.py",
    "triton_kernels.py": "attention/triton_kernels.py",
    "configuration_sbtrain.py": "hf/configuration_sbtrain.py",
    "modeling_sbtrain.py": "hf/modeling_sbtrain.py",
}
ATTENTION_MODULES = ("dispatch", "triton_kernels", "triton_jit", "context_parallel")  # modules
INSTALL_HINT = f"sbtrain export needs safetensors: {HF_INSTALL}"


def relative_source(text: str) -> str:
    """An sbtrain source with its `sbtrain` imports made relative to a flat folder.

    `sbtrain.config` is imported by model.py for annotations only (postponed by
    `from __future__ import annotations`), so its import is dropped.
    """
    text = re.sub(r"^from sbtrain\.config import [^\n]*\n", "", text, flags=re.M)
    text = re.sub(
        r"^(\s*)from sbtrain\.(?:attention|hf)\.(\w+) import",
        r"\1from .\2 import",
        text,
        flags=re.M,
    )
    text = re.sub(
        r"^(\s*)from sbtrain\.(?!attention\b)(\w+) import", r"\1from .\2 import", text, flags=re.M
    )

    def split(match: re.Match) -> str:  # `from sbtrain.attention import f, dispatch`
        indent, names = match[1], [n.strip() for n in match[2].split(",")]
        modules = [n for n in names if n.split(" as ")[0] in ATTENTION_MODULES]
        functions = [n for n in names if n not in modules]
        lines = [f"{indent}from . import {m}" for m in modules]
        if functions:
            lines.insert(0, f"{indent}from .attention import {', '.join(functions)}")
        return "\n".join(lines)

    text = re.sub(r"^(\s*)from sbtrain\.attention import ([^\n(]+)$", split, text, flags=re.M)
    left = re.search(r"^\s*(from|import) sbtrain\b[^\n]*", text, flags=re.M)
    if left:
        raise AssertionError(f"an sbtrain import left in an exported source: {left[0].strip()}")
    return text


def exported_sources() -> dict[str, str]:
    """File name in an exported folder -> the text `sbtrain export` writes there."""
    return {
        name: relative_source((PACKAGE / source).read_text(encoding="utf-8"))
        for name, source in SOURCES.items()
    }


def write_code(folder: Path) -> None:
    for name, text in exported_sources().items():
        (folder / name).write_text(text, encoding="utf-8")


def write_config(
    folder: Path, recipe_tree: dict, vocab_size: int, max_len: int, tokenizer: str | None = None
) -> None:
    """config.json (`tokenizer`: the kind of the exported tokenizer, which `eval-ppl hf:` asks
    of a split). Kinds with random buffers get a fixed seed when the recipe has none:
    transformers builds the model on the meta device, where drawing a seed from the global RNG
    fails; the buffers drawn from it are replaced by the saved ones anyway."""
    section = json.loads(json.dumps(recipe_tree["model"]))
    attention = section["attention"]
    if attention["kind"] in RANDOM_KINDS and attention.get("seed") is None:
        attention["seed"] = 0
    config = {
        "model_type": "sbtrain",
        "architectures": ["SbtrainForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sbtrain.SbtrainConfig",
            "AutoModelForCausalLM": "modeling_sbtrain.SbtrainForCausalLM",
        },
        "vocab_size": vocab_size,
        "max_len": max_len,
        "sbtrain_model": section,
        "sbtrain_seed": recipe_tree["train"]["seed"],
        "sbtrain_tokenizer": tokenizer,
        "tie_word_embeddings": False,  # the output layer reads tok_emb itself: nothing to tie
        "dtype": "float32",
        "sbtrain_version": sbtrain.__version__,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_weights(folder: Path, weights: dict) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    tensors = {f"lm.{name}": tensor.contiguous() for name, tensor in weights.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def word_fast(tokenizer) -> tuple[object, dict]:
    """A word vocabulary as a WordLevel tokenizer: whitespace split, unknown words to <unk>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    eol = tokenizer.symbols[tokenizer.eol_id]
    fast = Tokenizer(WordLevel(tokenizer.index, unk_token=SPECIALS[tokenizer.unk_id]))
    fast.normalizer = normalizers.Replace("\n", f" {eol} ")  # binarization's line ends
    fast.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # str.split()
    specials = {"bos_token": eol, "eos_token": eol, "unk_token": SPECIALS[tokenizer.unk_id],
                "pad_token": SPECIALS[tokenizer.pad_id]}  # fmt: skip
    return fast, specials


def bpe_fast(tokenizer) -> tuple[object, dict]:
    """sbtrain's byte-level BPE is a `tokenizers` tokenizer already."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    eol = fast.id_to_token(tokenizer.eol_id)
    return fast, {"bos_token": eol, "eos_token": eol}


# sentencepiece_model.proto enums: piece types and model types
SP_NORMAL, SP_UNKNOWN, SP_CONTROL = 1, 2, 3
SP_UNIGRAM, SP_BPE = 1, 2


def sentencepiece_fast(tokenizer) -> tuple[object, dict]:
    """A sentencepiece model as a `tokenizers` Unigram or BPE tokenizer with its normalisation.

    sentencepiece, per line: its precompiled character map (NFKC etc.), whitespace runs to one
    space, no leading or trailing space, a "▁" first, every space as "▁", then its unigram
    lattice or BPE merges, consecutive unknown characters as one <unk>. The end-of-line piece
    is renamed to a newline and made an added token: newlines are split off before the
    normalisation (so each line is normalised alone, as binarization encodes it) and decode as
    newlines. sentencepiece never matches its control and unknown pieces in text, while a
    `tokenizers` model matches every piece: those pieces get names with a space, which the
    normalised text never holds ("<unk>" becomes " ⁇ ", the text sentencepiece decodes it to).
    Decoding gives sbtrain's text: each line as sentencepiece decodes it, joined by newlines.

    Two known differences, both rare (none in 10,000 lines of Wikipedia text; ~0.3% of random
    strings built from odd characters): `tokenizers`' Precompiled normaliser drops a
    combining mark that follows a character the map rewrites (U+3000 then U+0301), and a unigram
    tie in exact arithmetic ("III" as II+I or I+II) may be broken the other way, as the two
    libraries round the sums of piece scores differently.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_proto(tokenizer)
    names = []
    for i, piece in enumerate(proto.pieces):
        if i == tokenizer.eol_id:
            names.append("\n")
        elif piece.type == SP_UNKNOWN:
            names.append(" \u2047 ")
        else:
            names.append(piece.piece if piece.type == SP_NORMAL else f" {piece.piece}")
    normal = [i for i, piece in enumerate(proto.pieces) if piece.type == SP_NORMAL]
    if proto.trainer_spec.model_type == SP_UNIGRAM:
        model = models.Unigram([(n, p.score) for n, p in zip(names, proto.pieces)],
                               unk_id=tokenizer.unk_id, byte_fallback=False)  # fmt: skip
    else:  # sentencepiece BPE merges the pair whose piece scores highest first
        ids = {names[i]: i for i in normal}
        merges = [
            (names[i][:k], names[i][k:])
            for i in sorted(normal, key=lambda i: -proto.pieces[i].score)
            for k in range(1, len(names[i]))
            if names[i][:k] in ids and names[i][k:] in ids
        ]
        vocab = {name: i for i, name in enumerate(names)}
        model = models.BPE(vocab, merges, unk_token=names[tokenizer.unk_id], fuse_unk=True)
    steps = [normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)]
    steps = steps if proto.normalizer_spec.precompiled_charsmap else []  # identity rule: none
    steps += [
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex("^ | $"), ""),
        normalizers.Prepend("\u2581"),  # on a non-empty line only, as sentencepiece does
        normalizers.Replace(" ", "\u2581"),
    ]
    fast = Tokenizer(model)
    fast.normalizer = normalizers.Sequence(steps)
    fast.decoder = decoders.Sequence([  # sentencepiece's text: no space after a line start
        decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Replace("\n ", "\n"),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    fast.add_special_tokens([AddedToken("\n", special=True, normalized=False)])
    return fast, {"bos_token": "\n", "eos_token": "\n"}


def sentencepiece_proto(tokenizer):
    """The ModelProto of a sentencepiece tokenizer, refused where the conversion would differ."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # it needs protobuf, which tensorboard installs
        raise UserError(
            "exporting a sentencepiece tokenizer needs protobuf: pip install protobuf"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = {
        "a model type other than unigram or bpe": trainer.model_type not in (SP_UNIGRAM, SP_BPE),
        "byte fallback": trainer.byte_fallback,
        "user-defined or byte pieces": any(
            p.type not in (SP_NORMAL, SP_UNKNOWN, SP_CONTROL) for p in proto.pieces
        ),
        "whitespace as a suffix": trainer.treat_whitespace_as_suffix,
        "non-default whitespace handling": not (
            spec.add_dummy_prefix and spec.remove_extra_whitespaces and spec.escape_whitespaces
        ),
    }
    reasons = [name for name, present in unsupported.items() if present]
    if reasons:
        raise UserError(
            f"exporting this sentencepiece model is not supported ({', '.join(reasons)}); "
            "the model alone exports with --no-tokenizer"
        )
    return proto


FAST_TOKENIZERS = {"word": word_fast, "bpe": bpe_fast, "sentencepiece": sentencepiece_fast}


def build_tokenizer(tokenizer, max_len: int) -> tuple[object, dict]:
    """The `tokenizers` fast tokenizer of `tokenizer` and its tokenizer_config.json, or a
    UserError in one line for what does not convert. By default (`add_special_tokens`) an
    end-of-line token comes first, as sbtrain feeds every stream."""
    from tokenizers import processors

    if tokenizer.kind not in FAST_TOKENIZERS:  # hf: a transformers tokenizer of another folder
        raise UserError(
            f"exporting a {tokenizer.kind!r} tokenizer is not supported (an hf: tokenizer is "
            "the model folder's own, with its own special tokens); export the model alone "
            "with --no-tokenizer"
        )
    fast, specials = FAST_TOKENIZERS[tokenizer.kind](tokenizer)
    eol = specials["eos_token"]
    fast.post_processor = processors.TemplateProcessing(
        single=[eol, "$A"], pair=[eol, "$A", "$B"], special_tokens=[(eol, tokenizer.eol_id)]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **specials}  # fmt: skip
    return fast, config


def write_tokenizer(folder: Path, fast, config: dict) -> None:
    """tokenizer.json and tokenizer_config.json of `build_tokenizer`."""
    fast.save(str(folder / "tokenizer.json"))
    text = json.dumps(config, indent=2) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")


def export(
    path: str | Path,
    out_dir: str | Path,
    force: bool = False,
    data_dir: str | None = None,
    with_tokenizer: bool = True,
) -> dict:
    """Write checkpoint `path` as a transformers folder `out_dir`; returns a summary record.

    The tokenizer comes from `data_dir` (default: the recipe's data.dir). An existing `out_dir`
    is refused unless `force`. Everything is checked before anything is written, and the folder
    is written beside `out_dir` and renamed into place last: a refusal or a failure leaves an
    existing `out_dir` as it was.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise UserError(f"{out} exists: give --force to replace it, or another folder")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    model, recipe, task, _ = load_model(path, torch.device("cpu"), attention_impl="pytorch")
    if not hasattr(model, "decode"):
        raise UserError(f"{path} holds a {recipe.task} classifier: only language models export")
    tokenizer = task.tokenizer(data_dir, model.vocab_size) if with_tokenizer else None
    fast = None
    if tokenizer is not None:
        fast, tokenizer_config = build_tokenizer(tokenizer, model.max_len)
    kind = tokenizer.kind if tokenizer is not None else None
    with staging(out, force) as folder:  # written beside `out`, renamed into place when done
        write_code(folder)
        write_config(folder, recipe.to_dict(), model.vocab_size, model.max_len, kind)
        write_weights(folder, model.state_dict())
        if fast is not None:
            write_tokenizer(folder, fast, tokenizer_config)
    return {
        "checkpoint": str(path),
        "out_dir": str(out),
        "attention": recipe.model.attention.kind,
        "tokenizer": kind,
        "files": sorted(p.name for p in out.iterdir()),
    }
