"""An sbtrain language model as a transformers causal LM (the folder `sbtrain export` writes).

In an exported folder, the files beside this one are sbtrain's own model and attention sources
with their imports made relative, so the folder computes what sbtrain computes without sbtrain
installed. The attention runs on sbtrain's PyTorch path (its fused Triton kernels are not exported).

`logits` are log-probabilities (the tied softmax's, or the adaptive softmax's, which has no other
logits); their softmax is the model's distribution. `generate()` re-runs the whole sequence at
every step (no key-value cache): the same tokens as `sbtrain generate`, slower on long outputs.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

# Absolute here, so that sbtrain loads exported folders with this class (no remote code);
# `sbtrain export` makes them relative (`from .model import ...`) in the folder, where
# transformers copies into its module cache only the files named by `from .NAME import` lines:
# the sources reach dispatch and triton_kernels by `from . import NAME`, which it does not see.
from sbtrain.attention.dispatch import set_impl
from sbtrain.attention.triton_kernels import interpreting  # noqa: F401
from sbtrain.hf.configuration_sbtrain import SbtrainConfig
from sbtrain.model import TransformerLM, sinusoids


class AttentionSpec:
    """The recipe's `model.attention` as TransformerLM reads it: `kind` and `options()`."""

    def __init__(self, kind: str, **options):
        self.kind = kind
        self._options = {k: v for k, v in options.items() if v is not None}

    def options(self) -> dict:
        return dict(self._options)


class ModelSpec:
    """The recipe's `model` section as TransformerLM reads it (attributes)."""

    def __init__(self, section: dict):
        self.sinusoid_scale = 1.0  # folders exported before the key existed: amplitude 1
        self.__dict__.update(section)
        self.attention = AttentionSpec(**section["attention"])


class SbtrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SbtrainConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"

    def __init__(self, config: SbtrainConfig):
        super().__init__(config)
        self.lm = TransformerLM(ModelSpec(config.sbtrain_model), config.vocab_size, config.max_len)
        set_impl(self.lm, "pytorch")
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The sinusoid table, which is computed, not saved (transformers builds the model on
        the meta device); every weight and random projection comes from model.safetensors."""
        if isinstance(module, TransformerLM) and hasattr(module, "pos_table"):
            module.pos_table = sinusoids(*module.pos_table.shape, module.cfg.sinusoid_scale)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> log-probabilities (B, T, V); with `labels` (B, T) also the mean
        NLL in nats of labels[:, 1:] given the tokens before them (-100: not scored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("sbtrain models take unpadded sequences: attention_mask must be all 1")
        hidden = self.lm(input_ids)
        loss = None
        if labels is not None:
            loss = self.lm.token_nll(hidden[:, :-1], labels[:, 1:]).mean()
        return CausalLMOutput(loss=loss, logits=self.lm.log_probs(hidden))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() then makes no key-value cache for this model

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        return {"input_ids": input_ids}  # no cache: the whole sequence every step
