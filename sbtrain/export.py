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
as `sbtrain generate` and every training stream start.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import sbtrain
from sbtrain.errors import UserError

PACKAGE = Path(sbtrain.__file__).parent
# file in the exported folder -> sbtrain source it is copied from
SOURCES = {
    "model.py": "model.py",
    "errors.py": "errors.py",
    "attention.py": "attention/__init__.py",
    **{
        f"{name}.py": f"attention/{name}.py"
        for name in ("common", "features", "full", "local", "lsh", "performer", "scatterbrain")
    },
    "dispatch.py": "attention/dispatch.py",
    "triton_kernels.py": "attention/triton_kernels.py",
    "configuration_sbtrain.py": "hf/configuration_sbtrain.py",
    "modeling_sbtrain.py": "hf/modeling_sbtrain.py",
}
ATTENTION_MODULES = ("dispatch", "triton_kernels", "triton_jit")  # imported as modules
RANDOM_KINDS = ("performer", "lsh", "scatterbrain")  # kinds with random projections (buffers)
INSTALL_HINT = "sbtrain export needs safetensors: pip install 'sbtrain[hf]'"


def relative_source(text: str) -> str:
    """An sbtrain source with its `sbtrain` imports made relative to a flat folder.

    `sbtrain.config` is imported by model.py for annotations only (postponed by
    `from __future__ import annotations`), so its import is dropped.
    """
    text = re.sub(r"^from sbtrain\.config import [^\n]*\n", "", text, flags=re.M)
    text = re.sub(
        r"^(\s*)from sbtrain\.attention\.(\w+) import", r"\1from .\2 import", text, flags=re.M
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


def write_config(folder: Path, recipe_tree: dict, vocab_size: int, max_len: int) -> None:
    """config.json. Kinds with random buffers get a fixed seed when the recipe has none:
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


def write_tokenizer(folder: Path, tokenizer, max_len: int) -> None:
    """tokenizer.json (a `tokenizers` fast tokenizer) and tokenizer_config.json."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from sbtrain.tokenizer import SPECIALS, BpeTokenizer, WordTokenizer

    if isinstance(tokenizer, WordTokenizer):
        eol = tokenizer.symbols[tokenizer.eol_id]
        fast = Tokenizer(WordLevel(tokenizer.index, unk_token=SPECIALS[tokenizer.unk_id]))
        fast.normalizer = normalizers.Replace("\n", f" {eol} ")  # binarization's line ends
        fast.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # str.split()
        specials = {"bos_token": eol, "eos_token": eol, "unk_token": SPECIALS[tokenizer.unk_id],
                    "pad_token": SPECIALS[tokenizer.pad_id]}  # fmt: skip
    elif isinstance(tokenizer, BpeTokenizer):
        fast = Tokenizer.from_str(tokenizer.tokenizer.to_str())
        eol = fast.id_to_token(tokenizer.eol_id)
        specials = {"bos_token": eol, "eos_token": eol}
    else:
        raise UserError(
            f"exporting a {tokenizer.kind} tokenizer is not supported yet (word and bpe are); "
            "the model alone can be exported with --no-tokenizer"
        )
    fast.post_processor = processors.TemplateProcessing(
        single=f"{eol} $A", pair=f"{eol} $A $B", special_tokens=[(eol, tokenizer.eol_id)]
    )
    fast.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **specials}  # fmt: skip
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
    is refused unless `force` (then it is replaced).
    """
    from sbtrain.evaluate import load_model

    out = Path(out_dir)
    if out.exists() and not force:
        raise UserError(f"{out} exists: give --force to replace it, or another folder")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    import torch

    model, recipe, _ = load_model(path, torch.device("cpu"), attention_impl="pytorch")
    if not hasattr(model, "decode"):
        raise UserError(f"{path} holds a {recipe.task} classifier: only language models export")
    tokenizer = None
    if with_tokenizer and recipe.task == "lm":
        from sbtrain.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(data_dir or recipe.data.dir)
        if tokenizer.vocab_size != model.vocab_size:
            raise UserError(
                f"the tokenizer in {data_dir or recipe.data.dir} has {tokenizer.vocab_size} "
                f"tokens, the model {model.vocab_size}: give its data folder with --data"
            )
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    write_code(out)
    write_config(out, recipe.to_dict(), model.vocab_size, model.max_len)
    write_weights(out, model.state_dict())
    if tokenizer is not None:
        write_tokenizer(out, tokenizer, model.max_len)
    return {
        "checkpoint": str(path),
        "out_dir": str(out),
        "attention": recipe.model.attention.kind,
        "tokenizer": tokenizer.kind if tokenizer is not None else None,
        "files": sorted(p.name for p in out.iterdir()),
    }
