"""sbtrain's attention kinds inside Hugging Face causal LMs: the drop-in, and `eval-ppl hf:PATH`.

    from sbtrain import dropin
    model = dropin.load("gpt2-folder", {"kind": "scatterbrain", "window": 32, "n_features": 32})
    model.save_pretrained("gpt2-scatterbrain")    # config and weights hold the swap and its draws
    model = dropin.load("gpt2-scatterbrain")      # the same model, the same draws

    # or with transformers' own loader, after one explicit registration:
    dropin.register()
    config = AutoConfig.from_pretrained("gpt2-folder")
    config.sbtrain_attention = {"n_features": 64, "seed": 0}   # optional: else the defaults
    model = AutoModelForCausalLM.from_pretrained(
        "gpt2-folder", config=config, attn_implementation="sbtrain_performer"
    )   # kernels are built on the first forward (the same draws as dropin.load's)

Standard architectures (GPT-2, Llama and others whose attention layers call transformers'
AttentionInterface) get `sbtrain_<kind>` implementations. The model computes queries, keys and
values as usual (Llama rotates them first); the kernel of the kind replaces the softmax. Each
attention layer holds its kernel as a submodule (`sbtrain_kernel`), so random projections (Performer
features, LSH rotations) are buffers of the model's state dict: drawn once per layer from the root
seed `sbtrain_attention["seed"]` (default 0) and the layer's index, saved by `save_pretrained`.

A folder written by `sbtrain export` holds sbtrain's own model: its swap replaces the kernel of
each block the way `sbtrain eval-ppl CKPT --attention` does, with the same draws (from the
recipe's train.seed, which the export records).

Served: whole sequences, causal, no padding or right padding (a real token never sees a later
pad). Refused with one line: left padding or any other mask, a key-value cache (the models run
with `use_cache=False`), attention dropout, sliding windows, soft-capping.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.attention import KINDS, RANDOM_KINDS, build_attention, check_attention, dispatch
from sbtrain.batch import IGNORE
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM, prepare_model
from sbtrain.tasks import recipe_from_dict
from sbtrain.tokenizer import HF_INSTALL, HFTokenizer, load_tokenizer

PREFIX_NAME = "sbtrain_"  # attn_implementation names: sbtrain_full, sbtrain_local, ...
KERNEL = "sbtrain_kernel"  # the submodule of each attention layer holding its kernel
DEFAULT_SEED = 0  # root seed of the per-layer draws when none is given
DEFAULT_LENGTH = 2048  # eval-ppl hf: blocks of a model without a position table, by default


def require_transformers(what: str = "this command"):
    """The transformers module, or a UserError naming what to install."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what} needs transformers: {HF_INSTALL}") from None
    return transformers


# ---------------------------------------------------------------------------------------------
# the attention function transformers calls


def register() -> None:
    """Register `sbtrain_<kind>` for every kind with transformers' attention and mask interfaces
    (idempotent). The masks are transformers' SDPA masks: None without padding, else boolean."""
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for kind in KINDS:
        AttentionInterface.register(PREFIX_NAME + kind, attention_forward)
        AttentionMaskInterface.register(PREFIX_NAME + kind, sdpa_mask)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention call: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D).

    The kernel's softmax temperature is D ** -0.5; another `scaling` (GPT-2's
    scale_attn_by_inverse_layer_idx) is applied to the queries first.
    """
    kind = module.config._attn_implementation.removeprefix(PREFIX_NAME)
    refuse_unserved(module, query, key, attention_mask, dropout, kwargs)
    kernel = layer_kernel(module, kind, query.shape[-1], query.device)
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention (Llama)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is not None and scaling != kernel_tau(query.shape[-1]):
        query = query * (scaling / kernel_tau(query.shape[-1]))
    out = kernel(query, key, value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def kernel_tau(head_dim: int) -> float:
    return head_dim**-0.5


def refuse_unserved(module, query, key, attention_mask, dropout, kwargs) -> None:
    """A ValueError, in one line, for anything the kernels would compute wrongly."""
    name = module.config._attn_implementation
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError(f"{name}: sbtrain's drop-in serves causal self-attention only")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{name}: {query.shape[2]} queries against {key.shape[2]} keys (a key-value cache?): "
            "sbtrain attention runs whole sequences; pass use_cache=False"
        )
    if dropout:
        raise ValueError(f"{name}: sbtrain kernels have no attention dropout; use model.eval()")
    for option in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(option) is not None:
            raise ValueError(f"{name}: the model asks for {option}, which sbtrain kernels lack")
    if attention_mask is not None:
        check_right_padding(attention_mask, name)


def check_right_padding(mask: torch.Tensor, name: str) -> None:
    """Accept a (B, 1|H, T, T) mask (bool True = attend, or additive float) that is the causal
    mask less keys at the end of each sequence (right padding): a real token sees every earlier
    token, so causal kernels computing the unpadded sequence give it the same output. Padded
    positions' outputs are not meaningful (nor are they in the original model)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed.all(dim=1)  # (B, T, T): the same for every head
    t = allowed.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=allowed.device).tril()
    if (allowed & ~causal).any():
        raise ValueError(f"{name}: the attention mask lets tokens see later ones; not causal")
    padded = (causal & ~allowed).any(dim=1)  # (B, T): keys masked for some query that may see them
    if (padded[:, :-1] & ~padded[:, 1:]).any():  # a padded key before a real one
        raise ValueError(
            f"{name}: only right padding is served (left padding or another mask changes what "
            "real tokens see); pad on the right (tokenizer.padding_side = 'right')"
        )


def layer_kernel(module: nn.Module, kind: str, head_dim: int, device) -> nn.Module:
    """The kernel of `module` (an attention layer), built on first use from the model's
    `sbtrain_attention` options and a seed drawn from the root seed and the layer index; always
    causal, whatever the options say (they may come from a config no check_spec has seen)."""
    kernel = getattr(module, KERNEL, None)
    if type(kernel) is KINDS[kind]:
        return kernel
    spec = dict(getattr(module.config, "sbtrain_attention", None) or {})
    if spec.pop("kind", kind) != kind:
        spec = {}  # options of another kind: this one runs with its defaults
    root = spec.pop("seed", None)
    spec.pop("causal", None)
    layer = getattr(module, "layer_idx", None)
    if kind in RANDOM_KINDS:
        if layer is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx to seed its draws from")
        spec["seed"] = layer_seed(DEFAULT_SEED if root is None else root, layer)
    kernel = build_attention(kind, head_dim=head_dim, causal=True, **spec).to(device)
    setattr(module, KERNEL, kernel)
    return kernel


def layer_seed(root: int, layer: int) -> int:
    """The seed of layer `layer`'s draws: the layer-th number of a generator seeded with root."""
    seeds = torch.randint(0, 2**62, (layer + 1,), generator=torch.Generator().manual_seed(root))
    return int(seeds[layer])


# ---------------------------------------------------------------------------------------------
# loading and swapping


def load(path: str | Path, attention: dict | None = None, device: str | torch.device = "cpu"):
    """The causal LM of transformers folder `path` in fp32 eval mode, its attention swapped for
    `attention` ({"kind": ..., options, "seed": root}) if given. A folder saved after a swap
    reloads with its kernels and their saved draws."""
    require_transformers("loading a Hugging Face model")
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json; give a folder written by save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_path} is not valid JSON") from None
    if config.get("model_type") == "sbtrain":
        model = load_export(folder, attention)
    else:
        model = load_standard(folder, attention, config.get("sbtrain_attention"))
    return model.to(device).eval()


@contextlib.contextmanager
def quiet():
    """transformers without progress bars and warnings (errors still show): a refused command
    prints one line, and a swap's kernel buffers are not "unexpected weights" to warn about."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _from_pretrained(folder: Path, config_only: bool = False, model_class=None, **kwargs):
    """transformers' AutoConfig (`config_only`) or AutoModelForCausalLM (or `model_class`) of
    `folder`, offline, running no code of the folder; a UserError in one line for what they
    cannot load (weights of other shapes, a corrupt weights file included)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with quiet():
            if config_only:
                return AutoConfig.from_pretrained(str(folder), local_files_only=True)
            return (model_class or AutoModelForCausalLM).from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32, **kwargs
            )
    except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as e:
        why = " ".join(str(e).split())[:200]
        raise UserError(
            f"{folder}: not a causal language model transformers can load ({why})"
        ) from None


def load_standard(folder: Path, attention: dict | None, saved: dict | None) -> nn.Module:
    register()
    spec = attention if attention is not None else saved
    if spec is None:
        return _from_pretrained(folder)
    if attention is None and spec.get("kind") not in RANDOM_KINDS:
        spec = {k: v for k, v in spec.items() if k != "seed"}  # saved with one by older sbtrain
    spec = check_spec(spec)
    config = _from_pretrained(folder, config_only=True)
    config.sbtrain_attention = spec
    model = _from_pretrained(folder, config=config, attn_implementation=PREFIX_NAME + spec["kind"])
    attach(model)
    if attention is None or spec == saved:
        restore_kernels(model, folder)
    return model


def check_spec(spec: dict) -> dict:
    """`spec` with its root seed filled in (kinds with random draws); a UserError for an unknown
    kind or option, for `causal` (a causal LM's attention is causal) and for a seed of a kind
    without random draws."""
    spec = dict(spec)
    kind = spec.get("kind")
    if "causal" in spec:
        raise UserError("--attention: causal is not an option here (a causal LM's attention is)")
    options = {k: v for k, v in spec.items() if k not in ("kind", "seed")}
    try:
        check_attention(kind, head_dim=64, **options)  # head_dim-independent checks
    except (ValueError, TypeError) as e:
        raise UserError(f"--attention: {e}") from None
    seed = spec.get("seed")
    if kind not in RANDOM_KINDS:
        if seed is not None:
            raise UserError(f"--attention: {kind} has no random draws to seed; leave seed out")
    elif seed is None:
        spec["seed"] = DEFAULT_SEED
    elif not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"--attention: seed must be a non-negative integer, got {seed!r}")
    return spec


def swap(model: nn.Module, kind: str, **options) -> nn.Module:
    """Swap the attention of a loaded standard model in place (`seed` among the options: the
    root of the per-layer draws); returns the model."""
    register()
    spec = check_spec({"kind": kind, **options})
    model.config.sbtrain_attention = spec
    model.set_attn_implementation(PREFIX_NAME + kind)
    for module in model.modules():  # kernels of another kind or other options go
        if hasattr(module, KERNEL):
            delattr(module, KERNEL)
    attach(model)
    return model


@torch.no_grad()
def attach(model: nn.Module) -> None:
    """Build every layer's kernel now (one forward of one token), so the state dict holds them
    before any real input; switch the key-value cache off (kernels run whole sequences)."""
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    except (ValueError, TypeError) as e:  # options the model's head size refuses, or a refusal
        raise UserError(f"{type(model).__name__} with sbtrain attention: {e}") from None
    if not any(hasattr(m, KERNEL) for m in model.modules()):
        raise UserError(
            f"{type(model).__name__} does not call transformers' attention interface: "
            "sbtrain's kinds cannot drop into it"
        )


def restore_kernels(model: nn.Module, folder: Path) -> None:
    """Load the kernel buffers saved in `folder` (if the model was saved after a swap)."""
    from safetensors import safe_open

    saved = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = [k for k in f.keys() if f".{KERNEL}." in k]  # noqa: SIM118 (not a dict)
            saved.update({k: f.get_tensor(k) for k in names})
    if saved:
        _, unexpected = model.load_state_dict(saved, strict=False)
        if unexpected:
            raise UserError(f"{folder}: saved kernel draws fit no layer ({unexpected[0]})")


def load_export(folder: Path, attention: dict | None) -> nn.Module:
    """A folder of `sbtrain export`, loaded with this sbtrain's classes (sbtrain.hf), never with
    the folder's code; its kernels swapped as `sbtrain eval-ppl --attention` swaps them: drawn
    while building the native model under the recipe's train.seed."""
    from sbtrain.hf.modeling_sbtrain import SbtrainForCausalLM  # imports transformers

    model = _from_pretrained(folder, model_class=SbtrainForCausalLM)
    if attention is None:
        return model
    config = model.config
    tree = {
        "model": config.sbtrain_model,
        "data": {"tokens_per_sample": config.max_len},
        "train": {"seed": getattr(config, "sbtrain_seed", 1)},
    }
    tree = recipe_from_dict(tree, str(folder), trusted=True).to_dict()  # as the export wrote it
    tree["model"]["attention"] = attention
    recipe = recipe_from_dict(tree, source=f"{folder} (--attention)")  # ConfigError: one line
    native = prepare_model(
        recipe, lambda: TransformerLM(recipe.model, config.vocab_size, config.max_len)
    )
    for block, twin in zip(model.lm.blocks, native.blocks):
        block.attn.kernel = twin.attn.kernel
    dispatch.set_impl(model, "pytorch")
    saved = dict(attention)
    if saved["kind"] in RANDOM_KINDS and saved.get("seed") is None:
        saved["seed"] = 0  # as the export writes it: the meta-device build needs one
    config.sbtrain_model = {**config.sbtrain_model, "attention": saved}
    return model


# ---------------------------------------------------------------------------------------------
# a scorer for eval-ppl hf:PATH


def load_scorer(
    folder: Path, attention: dict | None, device, attention_impl: str | None
) -> tuple[CausalLMScorer, dict]:
    """The causal LM of `folder` (its attention swapped for `attention` if given) as a scorer,
    and its `model_facts`: what `sbtrain eval-ppl hf:FOLDER` scores."""
    lm = load(folder, attention, device)
    if attention_impl is not None:
        dispatch.set_impl(lm, attention_impl)
    return CausalLMScorer(lm), model_facts(lm)


class CausalLMScorer(nn.Module):
    """A transformers causal LM behind the interface sbtrain.scoring uses."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V)."""
        return self.lm(input_ids=tokens, use_cache=False).logits

    def token_nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T, V), (B, T) -> (N,) nats of the scored targets."""
        keep = targets != IGNORE
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


def model_facts(lm: nn.Module) -> dict:
    """Context length (None: the config names none), whether it bounds the block length
    (a learned position table), the default block length, position kind and attention of a
    loaded model. The default is the context, but at most DEFAULT_LENGTH for a model without
    a position table (rotary models name contexts of 100 K tokens and more); an sbtrain export's
    is its training length."""
    config = lm.config
    if config.model_type == "sbtrain":
        section = config.sbtrain_model
        positions = section.get("positions", "learned")
        bounded = positions == "learned"
        return {
            "context": config.max_len,
            "bounded": bounded,
            "length": config.max_len,
            "positions": positions,
            "attention": section["attention"]["kind"],
        }
    context = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )  # None: the config names no context length
    rotary = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
    implementation = config._attn_implementation
    bounded = not rotary and context is not None
    return {
        "context": context,
        "bounded": bounded,
        "length": context if bounded or context is None else min(context, DEFAULT_LENGTH),
        "positions": "rope" if rotary else "learned",
        "attention": implementation.removeprefix(PREFIX_NAME),
    }


def check_data(folder: Path, data_dir: str, meta: dict, config) -> None:
    """The split must hold the ids the model reads. An `sbtrain export`: a split of the
    exported tokenizer's kind (when the export recorded one) and of its vocabulary size, as
    `eval-ppl CKPT` asks. Another model: a split made with `data.tokenizer: hf:...`, ids below
    its embedding rows, with the very tokenizer in the model's folder (when it has one)."""
    kind, size = meta.get("tokenizer"), int(meta["vocab_size"])
    if config.model_type == "sbtrain":
        exported = getattr(config, "sbtrain_tokenizer", None)
        if size != config.vocab_size or exported not in (None, kind):
            trained = f"a {exported} vocabulary" if exported else "a vocabulary"
            raise UserError(
                f"{data_dir} holds {kind} ids of a vocabulary of {size}, the model was trained on "
                f"{trained} of {config.vocab_size}: give the data folder of the exported "
                "checkpoint with --data"
            )
        return
    prepare = f"preprocess it with the model's tokenizer (data.tokenizer: hf:{folder})"
    if kind != HFTokenizer.kind:
        raise UserError(f"{data_dir} was prepared with sbtrain's {kind} tokenizer; {prepare}")
    if size > config.vocab_size:
        raise UserError(
            f"{data_dir} has a vocabulary of {size}, the model {config.vocab_size}: {prepare}"
        )
    mine = load_tokenizer(data_dir)
    try:
        theirs = HFTokenizer.from_file(folder)
    except UserError:
        return  # the model folder has no tokenizer: the size check is all there is
    if mine.vocabulary() != theirs.vocabulary():
        raise UserError(
            f"{data_dir} was prepared with another tokenizer than {folder}'s; {prepare}"
        )
