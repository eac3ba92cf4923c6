"""The configuration of an sbtrain language model in the Hugging Face transformers format.

Written by `sbtrain export`; `AutoConfig.from_pretrained(FOLDER, trust_remote_code=True)` reads it
(sbtrain itself reads it with this installed class, running no code of the folder).
"""

from transformers import PreTrainedConfig


class SbtrainConfig(PreTrainedConfig):
    model_type = "sbtrain"

    vocab_size: int = 8  # entries of the token embedding (and of the output layer)
    max_len: int = 64  # positions the model was built for (the training length)
    sbtrain_model: dict | None = None  # the `model` section of the sbtrain recipe
    sbtrain_seed: int = 1  # the recipe's train.seed: a swap's kernels draw from it, as in sbtrain
    sbtrain_tokenizer: str | None = None  # kind of the exported tokenizer (word, bpe, ...)
