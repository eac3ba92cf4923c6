"""`sbtrain generate`: sampling, one token at a time from per-layer attention caches.

full and local attention decode with a KV cache (local: bounded by its window); performer and
scatterbrain with `sparse: local` keep a recurrent state (running sums of phi(k) v^T and phi(k)
plus the window's keys), so a step costs the same at any context length. LSH kinds recompute.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from sbtrain.checkpoint import load_model
from sbtrain.distributed import pick_device
from sbtrain.errors import UserError
from sbtrain.model import TransformerLM


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf all but the top_k logits and the smallest set whose probability >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Sample(NamedTuple):
    tokens: list[int]  # the generated ids
    logprobs: list[float]  # the model's log-probability of each (before temperature, top-k/p)


@torch.no_grad()
def sample(
    model: TransformerLM,
    prompt: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Sample:
    """Continue `prompt` (token ids) by `max_tokens` tokens; temperature 0 is greedy."""
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    hidden, caches = model.decode(tokens, None, start=0)  # prefill the prompt at once
    out, logprobs = [], []
    for step in range(max_tokens):
        logits = model.log_probs(hidden[:, -1])  # (1, V) log-probabilities
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(int(nxt))
        logprobs.append(float(logits[0, out[-1]]))
        if step + 1 < max_tokens:
            hidden, caches = model.decode(nxt, caches, start=len(prompt) + step)
    return Sample(out, logprobs)


def main(
    path: str,
    prompt: str,
    max_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    attention: dict | None = None,
    data_dir: str | None = None,
    attention_impl: str | None = None,
) -> dict:
    """Sample a continuation of a text prompt (copy task: space-separated symbol ids).

    A text prompt is preceded by an end-of-line token, as the start of every training stream
    is; the tokenizer comes from `data_dir` (default: the recipe's data.dir).
    """
    for bad, message in [
        (temperature < 0, f"--temperature {temperature}: must be >= 0"),
        (not 0 < top_p <= 1, f"--top-p {top_p}: must be in (0, 1]"),
        (top_k < 0, f"--top-k {top_k}: must be >= 0"),
        (max_tokens < 1, f"--max-tokens {max_tokens}: must be >= 1"),
    ]:
        if bad:
            raise UserError(message)
    model, recipe, task, _ = load_model(path, pick_device(device), attention, attention_impl)
    if not hasattr(model, "decode"):
        raise UserError(f"{path} holds a {recipe.task} classifier: only language models generate")
    ids, shown, decode = task.encode_prompt(prompt, data_dir, model.vocab_size)
    fed = len(ids) + max_tokens - 1  # the last sampled token is never fed back
    if model.cfg.positions == "learned" and fed > model.max_len:
        raise UserError(
            f"the prompt ({len(ids) - shown} tokens) and --max-tokens {max_tokens} need {fed} "
            f"positions, the model has {model.max_len}: shorten the prompt or --max-tokens"
        )
    start = time.perf_counter()
    out, logprobs = sample(model, ids, max_tokens, temperature, top_k, top_p, seed)
    seconds = time.perf_counter() - start
    return {
        "prompt_tokens": len(ids) - shown,
        "tokens": out,
        "logprobs": logprobs,
        "text": decode(out),
        "tokens_per_s": len(out) / max(seconds, 1e-9),
    }
