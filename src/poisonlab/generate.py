"""Batched, KV-cached sampling that scores its own samples, and scoring of given text.

Llama-architecture models (every poisonlab model, and Llama/Mistral/Qwen2-style Hugging Face
models) decode through :class:`StaticKVDecoder`: the model's own modules, with keys and
values written into a cache allocated once for the whole continuation. Hugging Face's
growing cache concatenates the whole cache at every token, which dominated decoding time
on CPU. Other architectures use the Hugging Face forward with its own cache.

At temperature 1 the log-probability of each sampled token under the model is read off the
same distribution it was drawn from, so the self-perplexity of a continuation costs no
second forward pass. ``score`` computes the same quantity with one full forward pass, for
continuations that come from elsewhere (or for checking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class StaticKVDecoder:
    """Incremental forward of a Llama-style ``*ForCausalLM`` with a preallocated KV cache."""

    def __init__(self, model, batch: int, max_len: int):
        self.model = model
        self.body = model.model
        cfg = model.config
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_kv = cfg.num_key_value_heads
        self.n_heads = cfg.num_attention_heads
        p = next(model.parameters())
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.body.layers]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.body.layers]
        self.pos = 0

    @staticmethod
    def supports(model) -> bool:
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        return (getattr(model.config, "model_type", "") in {"llama", "mistral", "qwen2"}
                and layers is not None and hasattr(body, "rotary_emb") and hasattr(model, "lm_head")
                and getattr(model.config, "sliding_window", None) is None)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [B, T]`` at the current position; returns float logits of the last position."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t = ids.shape
        start, end = self.pos, self.pos + t
        x = self.body.embed_tokens(ids)
        positions = torch.arange(start, end, device=ids.device)[None]
        cos, sin = self.body.rotary_emb(x, positions)
        for i, layer in enumerate(self.body.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            o = F.scaled_dot_product_attention(
                q, self.k[i][:, :, :end], self.v[i][:, :, :end], is_causal=start == 0 and t > 1,
                scale=a.scaling, enable_gqa=self.n_kv != self.n_heads)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.pos = end
        return self.model.lm_head(self.body.norm(x[:, -1:]))[:, -1].float()


class _HFDecoder:
    def __init__(self, model):
        self.model, self.past = model, None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :].float()


def decoder_for(model, batch: int, max_len: int, static: bool = True):
    if static and StaticKVDecoder.supports(model):
        return StaticKVDecoder(model, batch, max_len)
    return _HFDecoder(model)


@torch.no_grad()
def sample(
    model, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
    generator: torch.Generator | None = None, vocab_limit: int | None = None, static_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_tokens`` after each row of ``prompts`` (all rows the same length).

    Returns ``(tokens, logprobs)``, both ``[batch, new_tokens]``; ``logprobs`` are under the
    model's own (temperature 1) distribution. ``vocab_limit`` masks padded embedding rows.
    Sampling does not stop at end-of-text: every row gets exactly ``new_tokens`` tokens.
    """
    device = prompts.device
    step = decoder_for(model, prompts.shape[0], prompts.shape[1] + new_tokens, static_cache)
    logits = step(prompts)
    tokens = torch.empty(prompts.shape[0], new_tokens, dtype=torch.long, device=device)
    logprobs = torch.empty(prompts.shape[0], new_tokens, dtype=torch.float32, device=device)
    for i in range(new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        logp = F.log_softmax(logits, dim=-1)
        if temperature == 0:
            nxt = logp.argmax(-1, keepdim=True)
        else:
            # softmax of the raw logits, as Hugging Face's sampler computes it, so that the same
            # seed draws the same tokens as ``generate(do_sample=True)``
            probs = F.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens[:, i] = nxt[:, 0]
        logprobs[:, i] = logp.gather(1, nxt)[:, 0]
        if i + 1 < new_tokens:
            logits = step(nxt)
    return tokens, logprobs


@torch.no_grad()
def score(model, prompts: torch.Tensor, continuations: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
    """Log-probabilities ``[batch, len]`` of ``continuations`` after ``prompts`` under ``model``."""
    ids = torch.cat([prompts, continuations], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[:, prompts.shape[1] - 1 : -1, :].float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[..., vocab_limit:] = float("-inf")
    return F.log_softmax(logits, dim=-1).gather(2, continuations.unsqueeze(-1))[..., 0]
