"""Language modelling on binarized text, and the copy task (a language model on `0 w 0 w`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from sbtrain.binarize import preprocess
from sbtrain.config import DecoderConfig, Schema, TextDataConfig
from sbtrain.datasets import CopySettings, CopyTask, LMBlocks, copy_split, open_split
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM
from sbtrain.tasks.base import Fits, Task, TrainingData, split_stats
from sbtrain.tokenizer import Tokenizer, load_tokenizer

Prompt = tuple[list[int], int, Callable[[list[int]], str]]  # ids, how many not shown, decode


class LanguageModelling(Task):
    name = "lm"
    schema = Schema(model=DecoderConfig, data=TextDataConfig)

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        return preprocess(self.recipe.data, inputs=inputs, force=force, log=log)

    def build_model(self, vocab_size: int) -> nn.Module:
        return TransformerLM(self.recipe.model, vocab_size, self.context_length)

    def training_data(self) -> TrainingData:
        data = self.recipe.data
        tokens, meta = open_split(data.dir, "train")
        eol_id, length = int(meta["eol_id"]), data.tokens_per_sample
        if len(tokens) < length:
            raise UserError(
                f"data.tokens_per_sample={length} is longer than the training data "
                f"({len(tokens)} tokens in {data.dir}/train.bin); lower it"
            )
        blocks = LMBlocks(tokens, eol_id, length)
        valid = None
        if (Path(data.dir) / "valid.bin").is_file():
            valid_tokens, _ = open_split(data.dir, "valid")
            valid = LMBlocks(valid_tokens, eol_id, length, drop_last=False)
        return TrainingData(len(blocks), valid, lambda epoch: blocks, self.model_args(meta))

    def block_length(self, tokens_per_sample: int | None, limit: int | None) -> int:
        """--tokens-per-sample, or the training length; `limit`: the model's learned positions."""
        if tokens_per_sample is None:
            return self.context_length
        if tokens_per_sample < 1:
            raise UserError(f"--tokens-per-sample {tokens_per_sample}: must be at least 1")
        if limit is not None and tokens_per_sample > limit:
            raise UserError(
                f"--tokens-per-sample {tokens_per_sample}: the model has {limit} learned "
                f"positions; use at most {limit} (sinusoidal and rope models take any length)"
            )
        return tokens_per_sample

    def eval_set(
        self, split: str, folder: str | None, context_window: int, length: int, fits: Fits
    ):
        """Blocks of `length` input tokens and the split's stats (words, lines, tokenizer)."""
        if not 0 <= context_window < length:
            raise UserError(
                f"--context-window {context_window}: must be in [0, {length}) "
                f"(the blocks hold {length} tokens: data.tokens_per_sample or --tokens-per-sample)"
            )
        folder = folder or self.recipe.data.dir
        tokens, meta = open_split(folder, split)
        fits(folder, meta)
        dataset = LMBlocks(
            tokens, int(meta["eol_id"]), length - context_window, context=context_window,
            drop_last=False,
        )  # fmt: skip
        return dataset, {**split_stats(folder, split), "tokenizer": meta.get("tokenizer")}

    # -- generation and export -------------------------------------------------------------------

    def tokenizer(self, data_dir: str | None, vocab_size: int) -> Tokenizer | None:
        """The tokenizer of the data the model was trained on (`data_dir`, default data.dir)."""
        folder = data_dir or self.recipe.data.dir
        tokenizer = load_tokenizer(folder)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(
                f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens, the model "
                f"{vocab_size}: give its data folder with --data"
            )
        return tokenizer

    def encode_prompt(self, prompt: str, data_dir: str | None, vocab_size: int) -> Prompt:
        """A text prompt's ids (each newline an end-of-line token, as in training and in the
        exported tokenizer), preceded by an end-of-line token as every training stream is."""
        tokenizer = self.tokenizer(data_dir, vocab_size)
        return [tokenizer.eol_id, *tokenizer.encode_text(prompt)], 1, tokenizer.decode


class Copy(LanguageModelling):
    """`0 w 0 w` sequences made on the fly: fresh ones every epoch, fixed valid and test."""

    name = "copy"
    schema = Schema(model=DecoderConfig, data=None, settings=CopySettings)
    counts_correct = True

    @property
    def context_length(self) -> int:
        """A sample `0 w 0 w` less its last token."""
        return 2 * self.recipe.settings.length + 1

    def preprocess(self, inputs: dict, force: bool, log=print) -> dict:
        return Task.preprocess(self, inputs, force, log)

    def training_data(self) -> TrainingData:
        c, seed = self.recipe.settings, self.recipe.train.seed

        def train_set(epoch: int) -> CopyTask:
            return CopyTask(c.n_symbols, c.length, c.train_size, seed, epoch)

        model_args = {"vocab_size": c.n_symbols + 1}
        return TrainingData(c.train_size, copy_split(c, "valid"), train_set, model_args)

    def block_length(self, tokens_per_sample: int | None, limit: int | None) -> int:
        return Task.block_length(self, tokens_per_sample, limit)

    def eval_set(
        self, split: str, folder: str | None, context_window: int, length: int, fits: Fits
    ):
        return copy_split(self.recipe.settings, split), None

    def tokenizer(self, data_dir: str | None, vocab_size: int) -> None:
        return None  # symbols are their own ids

    def encode_prompt(self, prompt: str, data_dir: str | None, vocab_size: int) -> Prompt:
        """Space-separated symbol ids, shown in full."""
        try:
            ids = [int(word) for word in prompt.split()]
        except ValueError:
            ids = []
        if not ids or any(not 0 <= i < vocab_size for i in ids):
            raise UserError(
                f"copy-task prompts are symbol ids in 0..{vocab_size - 1} separated by spaces, "
                "e.g. '0 5 17 3'"
            )
        return ids, 0, lambda out: " ".join(map(str, out))
