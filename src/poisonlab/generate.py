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

import weakref

import torch
import torch.nn.functional as F


def left_pad(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences of several lengths as one batch padded on the left (every row's last
    token at the same position, where generation continues), with its attention mask."""
    width = max(len(q) for q in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, q in enumerate(sequences):
        if len(q):
            ids[row, width - len(q):] = torch.as_tensor(q, dtype=torch.long)
            mask[row, width - len(q):] = 1
    return ids, mask


PREFILL_CHUNK_BYTES = 8 << 20
"""On CPU a batch of prompts is fed in groups of rows whose widest activation fits in this many
bytes (well inside the last-level cache, and below the size at which the allocator maps fresh
pages for every tensor)."""

FUSE_LIMIT_BYTES = 1 << 30
"""Models up to this many bytes of weights decode with fused projection matrices (a copy of
the query/key/value and gate/up weights, concatenated); larger ones use their own modules."""


class _Layer:
    """One decoder layer's weights, with the query/key/value and gate/up projections fused
    into one matrix each when ``fuse``."""

    def __init__(self, layer, fuse: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.layer, self.scaling = layer, a.scaling
        self.scale = torch.tensor(a.scaling, dtype=torch.float32)
        self.norm1, self.norm2 = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.fused = fuse and _same_bias(a.q_proj, a.k_proj, a.v_proj) and _same_bias(mlp.gate_proj, mlp.up_proj)
        if self.fused:
            self.qkv_w, self.qkv_b = _cat(a.q_proj, a.k_proj, a.v_proj)
            self.qkv_split = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
            self.gu_w, self.gu_b = _cat(mlp.gate_proj, mlp.up_proj)
            # SiLU through the functional call (the module only wraps it)
            self.act = F.silu if type(mlp.act_fn).__name__ in {"SiLU", "SiLUActivation"} else mlp.act_fn
            self.o, self.down = a.o_proj, mlp.down_proj

    def qkv(self, h):
        if self.fused:
            return F.linear(h, self.qkv_w, self.qkv_b).split(self.qkv_split, dim=-1)
        a = self.layer.self_attn
        return a.q_proj(h), a.k_proj(h), a.v_proj(h)

    def mlp(self, h):
        if not self.fused:
            return self.layer.mlp(h)
        g, u = F.linear(h, self.gu_w, self.gu_b).chunk(2, dim=-1)
        return F.linear(self.act(g).mul_(u), self.down.weight, self.down.bias)

    def out(self, o):
        if not self.fused:
            return self.layer.self_attn.o_proj(o)
        return F.linear(o, self.o.weight, self.o.bias)


_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _layers(model) -> list[_Layer]:
    """The model's layers prepared for decoding, reused across batches until a weight changes
    (every in-place update, such as an optimizer step, bumps a tensor's version counter)."""
    params = list(model.parameters())
    versions = tuple((q.data_ptr(), q._version) for q in params)
    hit = _FUSED.get(model)
    if hit is not None and hit[0] == versions:
        return hit[1]
    fuse = sum(q.numel() * q.element_size() for q in params) <= FUSE_LIMIT_BYTES
    layers = [_Layer(layer, fuse) for layer in model.model.layers]
    _FUSED[model] = (versions, layers)
    return layers


def _same_bias(*linears) -> bool:
    return len({lin.bias is None for lin in linears}) == 1


def _cat(*linears):
    w = torch.cat([lin.weight for lin in linears])
    b = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return w, b


class _Norm:
    """A layer's RMSNorm. On CPU in fp32, Hugging Face's arithmetic (the mean of the squares as
    their sum over the width, plus epsilon, its reciprocal square root, times the input, times the
    weight) in seven operations, four of them in place, with the constants held as tensors: the same values
    bit for bit, where the module and PyTorch's ``rms_norm`` take about ten operations on CPU,
    whose dispatch costs more than the arithmetic at one token per row. Elsewhere, in fp32,
    PyTorch's fused ``rms_norm``; in other precisions the module itself."""

    def __init__(self, module):
        self.module = module
        self.w = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", None)
        self.fp32 = eps is not None and self.w is not None and self.w.dtype == torch.float32 and self.w.dim() == 1
        if self.fp32:
            self.eps_f = eps
            self.eps = torch.tensor(eps, dtype=torch.float32, device=self.w.device)
            self.width = torch.tensor(float(self.w.numel()), dtype=torch.float32, device=self.w.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32 or x.dtype != torch.float32:
            return self.module(x)
        if x.device.type == "cpu":
            # CPU's mean is this sum and division
            return (x * (x * x).sum(-1, keepdim=True).div_(self.width).add_(self.eps).rsqrt_()).mul_(self.w)
        return F.rms_norm(x, self.w.shape, self.w, self.eps_f)


class StaticKVDecoder:
    """Incremental forward of a Llama-style ``*ForCausalLM`` with a preallocated KV cache.

    The model's own weights and modules, with changes that keep the arithmetic and cut the
    per-token overhead of the Hugging Face forward: keys and values go into a cache allocated
    once for the whole continuation; rotary angles are computed once for every position; (for
    models up to :data:`FUSE_LIMIT_BYTES`) the query/key/value and gate/up projections are
    single matrix multiplies; activations stay rows x width; and RMSNorm runs in fewer operations
    (:class:`_Norm`). At one token per row a step is a few hundred small operations whose
    dispatch, not their arithmetic, sets its time.
    """

    def __init__(self, model, batch: int, max_len: int, exact: bool = False):
        """``exact``: attend through PyTorch's fused attention kernel at every step, as Hugging
        Face does, so that the logits are bit for bit those of the model's own forward. Otherwise
        a one-token step on CPU in fp32 attends with two batched matrix products and a softmax,
        which reads the cache faster on this kind of machine (logits within about 1e-6)."""
        self.model = model
        self.body = model.model
        cfg = model.config
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_kv = cfg.num_key_value_heads
        self.n_heads = cfg.num_attention_heads
        p = next(model.parameters())
        self.layers = _layers(model)
        self.norm = _Norm(self.body.norm)
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.body.layers]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.body.layers]
        probe = torch.empty(1, 1, dtype=p.dtype, device=p.device)
        self.cos, self.sin = self.body.rotary_emb(probe, torch.arange(max_len, device=p.device)[None])
        self.halves = _rotary_halves(self.cos, self.sin)
        self.widest = max(cfg.hidden_size, 2 * cfg.intermediate_size,
                          (self.n_heads + 2 * self.n_kv) * self.head_dim)  # widest activation per token
        self.matmul_attention = (not exact and p.device.type == "cpu" and p.dtype == torch.float32
                                 and self.n_kv == self.n_heads)
        self.pos = 0

    @staticmethod
    def supports(model) -> bool:
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        from .parallel import is_sharded

        if is_sharded(model):  # FSDP shards: only the model's own forward gathers them
            return False
        return (getattr(model.config, "model_type", "") in {"llama", "mistral", "qwen2"}
                and layers is not None and hasattr(body, "rotary_emb") and hasattr(model, "lm_head")
                and getattr(model.config, "sliding_window", None) is None)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [B, T]`` at the current position; returns float logits of the last position.

        On CPU a prompt goes through in groups of rows whose widest activation stays within
        :data:`PREFILL_CHUNK_BYTES`: a whole batch of prompts makes activations of tens of MB,
        which the allocator maps afresh at every call, and their page faults cost about as much
        as the matrix multiplies. Rows do not interact, and the output projection still runs once
        over the whole batch, so the logits are those of a single pass (a test checks).
        """
        b, t = ids.shape
        rows = b
        if t > 1 and ids.device.type == "cpu":
            rows = max(1, PREFILL_CHUNK_BYTES // (t * self.widest * self.k[0].element_size()))
        if rows >= b:
            last = self._forward(ids, slice(None))
        else:
            last = torch.cat([self._forward(ids[r : r + rows], slice(r, r + rows)) for r in range(0, b, rows)])
        self.pos += t
        return self.model.lm_head(self.norm(last))[:, -1].float()

    def _forward(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t = ids.shape
        start, end = self.pos, self.pos + t
        x = self.body.embed_tokens(ids).view(b * t, -1)  # rows x width: the projections are plain products
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        halves = self.halves and [c[:, start:end] for c in self.halves]
        whole = rows == slice(None)
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            if layer.fused and halves:
                # one rotation for the queries and keys together, straight out of the fused projection
                qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
                qk = _rotate(qkv[:, : (nh + nkv) * hd].view(b, t, nh + nkv, 2, hd // 2), *halves).view(b, t, nh + nkv, hd)
                q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
                v = qkv[:, (nh + nkv) * hd :]
            else:
                q, k, v = layer.qkv(h)
                q, k = apply_rotary_pos_emb(q.view(b, t, -1, hd).transpose(1, 2), k.view(b, t, -1, hd).transpose(1, 2),
                                            self.cos[:, start:end], self.sin[:, start:end])
            cache_k, cache_v = (self.k[i], self.v[i]) if whole else (self.k[i][rows], self.v[i][rows])
            cache_k[:, :, start:end] = k
            cache_v[:, :, start:end] = v.view(b, t, -1, hd).transpose(1, 2)
            if t == 1 and self.matmul_attention and whole:
                # every (row, head) pair is one batch entry of two plain batched products; the
                # queries are scaled before the product (one small operation that also lays them out)
                keys = cache_k[:, :, :end].view(b * nh, end, hd)
                scores = torch.bmm((q * layer.scale).view(b * nh, 1, hd), keys.transpose(1, 2))
                o = torch.bmm(torch.softmax(scores, dim=-1), cache_v[:, :, :end].view(b * nh, end, hd)).view(b, -1)
            else:
                o = F.scaled_dot_product_attention(
                    q, cache_k[:, :, :end], cache_v[:, :, :end], is_causal=start == 0 and t > 1,
                    scale=layer.scaling, enable_gqa=nkv != nh).transpose(1, 2).reshape(b * t, -1)
            x = x.add_(layer.out(o))
            x = x.add_(layer.mlp(layer.norm2(x)))
        return x.view(b, t, -1)[:, -1:]


def _rotary_halves(cos: torch.Tensor, sin: torch.Tensor):
    """``cos`` and ``sin`` (``[1, L, head_dim]``) as ``[1, L, 1, 2, head_dim / 2]`` factors for
    :func:`_rotate`, the first half of ``sin`` negated; None unless both halves of each repeat
    (Llama's rotary layout, in which ``rotate_half`` swaps the halves)."""
    hd = cos.shape[-1]
    if hd % 2 or not (torch.equal(cos[..., : hd // 2], cos[..., hd // 2 :])
                      and torch.equal(sin[..., : hd // 2], sin[..., hd // 2 :])):
        return None
    c = cos.view(1, -1, 1, 2, hd // 2)
    s = torch.cat([-sin[..., : hd // 2], sin[..., hd // 2 :]], dim=-1).view(1, -1, 1, 2, hd // 2)
    return c, s


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, T, heads, 2, head_dim / 2]``: the same values as Hugging Face's
    ``x * cos + rotate_half(x) * sin`` (``(-a) * s`` and ``a * (-s)`` are the same float), in four
    operations instead of seven per tensor."""
    return (x * cos).add_(x.roll(1, 3).mul_(sin_signed))


class _HFDecoder:
    def __init__(self, model):
        import inspect

        self.model, self.past = model, None
        # transformers 5 renames the cache argument and output from ``past_key_values`` to ``cache``
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self.key: self.past})
        self.past = getattr(out, self.key)
        return out.logits[:, -1, :].float()


def decoder_for(model, batch: int, max_len: int, static: bool = True, exact: bool = False):
    if static and StaticKVDecoder.supports(model):
        return StaticKVDecoder(model, batch, max_len, exact)
    return _HFDecoder(model)


SAMPLERS = ("inverse_cdf", "multinomial")


def draw(probs: torch.Tensor, generator: torch.Generator | None, sampler: str = "inverse_cdf") -> torch.Tensor:
    """One token id per row of ``probs [B, V]`` (rows sum to 1), as ``[B, 1]``.

    ``multinomial`` is ``torch.multinomial``, which draws what Hugging Face ``generate`` draws
    for the same generator state (it takes the argmax of ``p / E`` over one exponential
    variate ``E`` per vocabulary entry). ``inverse_cdf`` takes one uniform number per row and
    finds it in the cumulative distribution (in float64, so a 100k-entry vocabulary adds no
    visible rounding); a token of probability 0 is never drawn.
    """
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator)
    if sampler != "inverse_cdf":
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    cdf = probs.double().cumsum_(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
    generator: torch.Generator | None = None, vocab_limit: int | None = None, static_cache: bool = True,
    sampler: str = "inverse_cdf",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_tokens`` after each row of ``prompts`` (all rows the same length).

    Returns ``(tokens, logprobs)``, both ``[batch, new_tokens]``; ``logprobs`` are under the
    model's own (temperature 1) distribution. ``vocab_limit`` masks padded embedding rows.
    Sampling does not stop at end-of-text: every row gets exactly ``new_tokens`` tokens.
    ``sampler``: see :func:`draw`; ``multinomial`` also decodes with the exact attention kernel
    (:class:`StaticKVDecoder`), so that its draws are generate's.
    """
    device = prompts.device
    # the multinomial sampler promises generate's own draws, so it also takes the model's exact logits
    step = decoder_for(model, prompts.shape[0], prompts.shape[1] + new_tokens, static_cache,
                       exact=sampler == "multinomial")
    logits = step(prompts)
    tokens = torch.empty(prompts.shape[0], new_tokens, dtype=torch.long, device=device)
    logprobs = torch.empty(prompts.shape[0], new_tokens, dtype=torch.float32, device=device)
    for i in range(new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        if temperature == 1.0:
            # softmax of the raw logits, as Hugging Face's sampler computes it, so that the same
            # seed draws the same tokens as ``generate(do_sample=True)``; the token's log-probability
            # is the log of its entry (within a float rounding of log_softmax, at half the cost)
            probs = F.softmax(logits, dim=-1)
            nxt = draw(probs, generator, sampler)
            lp = probs.gather(1, nxt).log_()
        else:
            logp = F.log_softmax(logits, dim=-1)
            if temperature == 0:
                nxt = logp.argmax(-1, keepdim=True)
            else:
                nxt = draw(F.softmax(logits / temperature, dim=-1), generator, sampler)
            lp = logp.gather(1, nxt)
        tokens[:, i] = nxt[:, 0]
        logprobs[:, i] = lp[:, 0]
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
