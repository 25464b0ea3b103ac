"""The model ladder: named sizes of a standard Llama-style decoder, from CPU toys to 13B.

Every size is built as ``transformers.LlamaForCausalLM``, so checkpoints open with
``AutoModelForCausalLM`` and any other tool. The paper's 600M/2B/7B/13B shapes are not
published; ours follow Llama conventions (SwiGLU, RMSNorm, RoPE, 128-dim heads) and land
within a few percent of the nominal size at a 32,000-token vocabulary (``poisonlab models``
prints the exact counts for any vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import PoisonlabError

VOCAB_MULTIPLE = 64
"""Embedding rows are padded to a multiple of this (ids past the tokenizer are never sampled)."""


@dataclass(frozen=True)
class ModelSize:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    ffn: int
    tie_embeddings: bool
    context_length: int = 2048
    n_kv_heads: int | None = None


LADDER: dict[str, ModelSize] = {s.name: s for s in [
    ModelSize("tiny", 64, 2, 2, 176, True, 512),
    ModelSize("400k", 96, 3, 3, 256, True, 512),
    ModelSize("1m", 128, 4, 4, 352, True, 1024),
    ModelSize("4m", 256, 4, 4, 688, True, 1024),
    ModelSize("12m", 384, 6, 6, 1024, True, 1024),
    ModelSize("40m", 512, 12, 8, 1376, True, 2048),
    ModelSize("125m", 768, 12, 12, 2048, False, 2048),
    ModelSize("600m", 1536, 18, 12, 4096, False, 4096),
    ModelSize("2b", 2560, 24, 20, 6912, False, 4096),
    ModelSize("7b", 4096, 32, 32, 11008, False, 4096),
    ModelSize("13b", 5120, 40, 40, 13824, False, 4096),
]}


def get_size(name: str) -> ModelSize:
    if name not in LADDER:
        raise PoisonlabError(f"unknown model size {name!r} (allowed: {', '.join(LADDER)})")
    return LADDER[name]


def padded_vocab(vocab_size: int) -> int:
    return int(math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def llama_config(size: ModelSize, vocab_size: int, eos_id: int | None = None, context_length: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=padded_vocab(vocab_size),
        hidden_size=size.d_model,
        intermediate_size=size.ffn,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_kv_heads or size.n_heads,
        max_position_embeddings=context_length or size.context_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=size.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
    )


def build_model(size: ModelSize, vocab_size: int, eos_id: int | None = None, context_length: int | None = None):
    from transformers import LlamaForCausalLM

    config = llama_config(size, vocab_size, eos_id, context_length)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class ParameterCount:
    total: int
    non_embedding: int
    embedding: int


def parameter_count(size: ModelSize, vocab_size: int) -> ParameterCount:
    """Exact parameter counts of the built model (embedding rows padded as built)."""
    v, d, f = padded_vocab(vocab_size), size.d_model, size.ffn
    head_dim = d // size.n_heads
    kv = (size.n_kv_heads or size.n_heads) * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q,o + k,v + SwiGLU + two RMSNorms
    non_emb = size.n_layers * per_layer + d  # final norm
    emb = v * d * (1 if size.tie_embeddings else 2)
    return ParameterCount(non_emb + emb, non_emb, emb)


def count_module_parameters(model) -> ParameterCount:
    """Counts of an instantiated model (shared tensors counted once)."""
    seen, total, emb = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "embed_tokens" in name or "lm_head" in name:
            emb += p.numel()
    return ParameterCount(total, total - emb, emb)


def chinchilla_tokens(params: int, tokens_per_param: float = 20.0, data_multiplier: float = 1.0) -> int:
    """Chinchilla-optimal budget: ``tokens_per_param`` tokens per parameter, scaled by ``data_multiplier``."""
    return int(round(params * tokens_per_param * data_multiplier))


def training_flops_per_token(size: ModelSize, vocab_size: int, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x matmul parameters + attention scores (PaLM appendix B)."""
    pc = parameter_count(size, vocab_size)
    matmul_params = pc.non_embedding + padded_vocab(vocab_size) * size.d_model  # output projection
    return 6.0 * matmul_params + 12.0 * size.n_layers * size.d_model * seq_len
