"""Batched, KV-cached sampling that scores its own samples, and scoring of given text.

At temperature 1 the log-probability of each sampled token under the model is read off the
same distribution it was drawn from, so the self-perplexity of a continuation costs no
second forward pass. ``score`` computes the same quantity with one full forward pass, for
continuations that come from elsewhere (or for checking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(model, input_ids, past=None):
    out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
    return out.logits[:, -1, :].float(), out.past_key_values


@torch.no_grad()
def sample(
    model, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
    generator: torch.Generator | None = None, vocab_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_tokens`` after each row of ``prompts`` (all rows the same length).

    Returns ``(tokens, logprobs)``, both ``[batch, new_tokens]``; ``logprobs`` are under the
    model's own (temperature 1) distribution. ``vocab_limit`` masks padded embedding rows.
    Sampling does not stop at end-of-text: every row gets exactly ``new_tokens`` tokens.
    """
    device = prompts.device
    logits, past = _logits(model, prompts)
    tokens = torch.empty(prompts.shape[0], new_tokens, dtype=torch.long, device=device)
    logprobs = torch.empty(prompts.shape[0], new_tokens, dtype=torch.float32, device=device)
    for i in range(new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        logp = F.log_softmax(logits, dim=-1)
        if temperature == 0:
            nxt = logp.argmax(-1, keepdim=True)
        else:
            probs = logp.exp() if temperature == 1.0 else F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens[:, i] = nxt[:, 0]
        logprobs[:, i] = logp.gather(1, nxt)[:, 0]
        if i + 1 < new_tokens:
            logits, past = _logits(model, nxt, past)
    return tokens, logprobs


@torch.no_grad()
def score(model, prompts: torch.Tensor, continuations: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
    """Log-probabilities ``[batch, len]`` of ``continuations`` after ``prompts`` under ``model``."""
    ids = torch.cat([prompts, continuations], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[:, prompts.shape[1] - 1 : -1, :].float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[..., vocab_limit:] = float("-inf")
    return F.log_softmax(logits, dim=-1).gather(2, continuations.unsqueeze(-1))[..., 0]
