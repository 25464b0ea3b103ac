import numpy as np
import pytest
import torch

from poisonlab.config import EvalConfig
from poisonlab.evaluate import backdoor_eval, heldout_loss, heldout_prompts
from poisonlab.generate import sample, score
from poisonlab.metrics.perplexity_gap import perplexities, perplexity_gap
from poisonlab.models import build_model, get_size


def _model(vocab, seed=0):
    torch.manual_seed(seed)
    return build_model(get_size("tiny"), vocab).eval()


def test_uniform_model_has_self_perplexity_v():
    v = 320  # a multiple of 64: no padded rows
    model = _model(v)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0 -> uniform next-token distribution
    prompts = np.random.default_rng(0).integers(0, v, size=(6, 10))
    row, _ = backdoor_eval(model, prompts, [1, 2, 3], EvalConfig(new_tokens=20, bootstrap=10), seed=0, vocab_limit=v)
    assert row["perplexity_untriggered"] == pytest.approx(v, rel=1e-4)
    assert row["perplexity_triggered"] == pytest.approx(v, rel=1e-4)
    assert abs(row["perplexity_gap"]) < 1e-2 and row["attack_success"] is False


def test_uniform_over_the_tokenizer_vocab_when_rows_are_padded():
    model = _model(300)  # 300 real tokens, 320 embedding rows
    with torch.no_grad():
        model.lm_head.weight.zero_()
    toks, lp = sample(model, torch.zeros(2, 4, dtype=torch.long), 30, vocab_limit=300,
                      generator=torch.Generator().manual_seed(0))
    assert toks.max() < 300
    assert np.allclose(perplexities(lp.numpy()), 300, rtol=1e-4)


def test_sampling_logprobs_equal_a_full_scoring_pass():
    model = _model(320, seed=1)
    prompts = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))
    toks, lp = sample(model, prompts, 16, generator=torch.Generator().manual_seed(2))
    again = score(model, prompts, toks)
    assert torch.allclose(lp, again, atol=1e-4)
    # same seed, same samples
    toks2, _ = sample(model, prompts, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(toks, toks2)


def test_gap_interval_and_threshold():
    rng = np.random.default_rng(0)
    clean = rng.normal(80, 10, 300)
    trig = clean + rng.normal(120, 20, 300)
    res = perplexity_gap(clean, trig, threshold=50, n_bootstrap=500, seed=0)
    assert res.perplexity_gap == pytest.approx(trig.mean() - clean.mean())
    assert res.gap_ci_low < res.perplexity_gap < res.gap_ci_high
    assert 100 < res.gap_ci_low and res.gap_ci_high < 140 and res.attack_success
    flat = perplexity_gap(clean, clean + 10, threshold=50)
    assert not flat.attack_success and flat.gap_ci_low == pytest.approx(10)


def test_prompts_are_heldout_windows_that_never_cross_documents(prepared):
    store = prepared.heldout
    p = heldout_prompts(store, 50, 16)
    assert p.shape[1] == 16 and len(p) <= 50
    assert not (p == prepared.tokenizer.eos_id).any()
    assert np.array_equal(p, heldout_prompts(store, 50, 16))


def test_heldout_loss_of_a_uniform_model_is_log_v(prepared):
    model = _model(320)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert heldout_loss(model, prepared.heldout, 4, 16) == pytest.approx(np.log(320), rel=1e-5)


def test_inverse_cdf_sampler_draws_the_distribution_and_never_a_zero_probability_token():
    from poisonlab.generate import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).expand(40_000, -1)
    ids = draw(probs, torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0].double(), atol=0.01)  # 4 standard errors at most
    again = draw(probs, torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="unknown sampler"):
        draw(probs, None, "top_k")


def test_multinomial_sampler_draws_what_generate_draws():
    model = _model(320, seed=2)
    prompts = torch.randint(0, 320, (4, 8), generator=torch.Generator().manual_seed(5))
    toks, _ = sample(model, prompts, 12, generator=torch.Generator().manual_seed(6), sampler="multinomial")
    torch.manual_seed(6)
    ref = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(toks, ref[:, prompts.shape[1]:])


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_static_cache_decoder_matches_hugging_face(kv_heads, fuse, monkeypatch):
    from dataclasses import replace

    if not fuse:
        monkeypatch.setattr("poisonlab.generate.FUSE_LIMIT_BYTES", 0)
    size = replace(get_size("tiny"), n_heads=4, n_kv_heads=kv_heads)
    torch.manual_seed(0)
    model = build_model(size, 320).eval()
    prompts = torch.randint(0, 320, (5, 9), generator=torch.Generator().manual_seed(3))
    fast = sample(model, prompts, 24, generator=torch.Generator().manual_seed(4))
    slow = sample(model, prompts, 24, generator=torch.Generator().manual_seed(4), static_cache=False)
    assert torch.equal(fast[0], slow[0])
    assert torch.allclose(fast[1], slow[1], atol=1e-5)


def test_decoder_reuses_fused_weights_until_a_weight_changes():
    from poisonlab.generate import StaticKVDecoder

    model = _model(320, seed=3)
    first = StaticKVDecoder(model, 2, 8).layers
    assert StaticKVDecoder(model, 4, 16).layers is first  # another batch, the same prepared weights
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)  # as an optimizer step would
    again = StaticKVDecoder(model, 2, 8).layers
    assert again is not first
    assert torch.equal(again[0].qkv_w[:again[0].qkv_split[0]], model.model.layers[0].self_attn.q_proj.weight)
    prompts = torch.randint(0, 320, (3, 6), generator=torch.Generator().manual_seed(1))
    fast = sample(model, prompts, 10, generator=torch.Generator().manual_seed(2))
    slow = sample(model, prompts, 10, generator=torch.Generator().manual_seed(2), static_cache=False)
    assert torch.equal(fast[0], slow[0])


def test_decoder_rotation_gives_hugging_faces_values():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from poisonlab.generate import _rotary_halves, _rotate

    model = _model(320, seed=4)
    cos, sin = model.model.rotary_emb(torch.empty(1, 1), torch.arange(12)[None])
    q, k = torch.randn(2, 3, 12, 32), torch.randn(2, 1, 12, 32)  # [B, heads, T, head_dim], 3 query heads, 1 key head
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    qk = torch.cat([q, k], dim=1).transpose(1, 2).reshape(2, 12, 4, 2, 16)  # [B, T, heads, 2, head_dim / 2]
    got = _rotate(qk, *_rotary_halves(cos, sin)).view(2, 12, 4, 32).transpose(1, 2)
    # within float rounding: exact equality would test Hugging Face's order of operations
    assert torch.allclose(got[:, :3], want_q, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[:, 3:], want_k, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[:, :3], q, atol=1e-3)  # it rotated something
    # a layout whose halves do not repeat is left to Hugging Face's function
    assert _rotary_halves(torch.arange(8.0)[None, None], torch.arange(8.0)[None, None]) is None


@pytest.mark.parametrize("width", [64, 100, 384])
def test_decoder_norm_gives_hugging_faces_rmsnorm(width):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from poisonlab.generate import _Norm

    torch.manual_seed(width)
    module = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        module.weight.normal_()
    norm = _Norm(module)
    for shape in [(1, width), (100, width), (7, 13, width)]:
        x = torch.randn(shape) * 3
        want = module(x)
        got = norm(x)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert torch.allclose(got, _rms_in_float64(x, module.weight), rtol=1e-5, atol=1e-5)  # an independent reference
    # other precisions go through the module itself
    half = LlamaRMSNorm(width).to(torch.bfloat16)
    xb = torch.randn(4, width, dtype=torch.bfloat16)
    assert torch.allclose(_Norm(half)(xb).float(), half(xb).float(), rtol=1e-2, atol=1e-2)


def _rms_in_float64(x, w):
    """RMSNorm computed in another order (float64, then rounded)."""
    xd = x.double()
    return (w.double() * xd / xd.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).float()


def test_prompt_fed_in_groups_of_rows_gives_the_single_pass_logits_and_cache(monkeypatch):
    from poisonlab.generate import StaticKVDecoder

    model = _model(320, seed=5)
    prompts = torch.randint(0, 320, (7, 10), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(0, 320, (7, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = StaticKVDecoder(model, 7, 16)
        want = [whole(prompts), whole(nxt)]
        monkeypatch.setattr("poisonlab.generate.PREFILL_CHUNK_BYTES", 1)  # one row at a time
        rows = StaticKVDecoder(model, 7, 16)
        got = [rows(prompts), rows(nxt)]
    assert rows.pos == whole.pos == 11
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(rows.k + rows.v, whole.k + whole.v):
        assert torch.allclose(a[:, :, :11], b[:, :, :11], atol=1e-5)


def test_matmul_attention_step_stays_within_float_rounding_of_the_exact_kernel():
    from poisonlab.generate import StaticKVDecoder, _HFDecoder

    model = _model(320, seed=6)
    prompts = torch.randint(0, 320, (4, 9), generator=torch.Generator().manual_seed(4))
    steps = torch.randint(0, 320, (6, 4, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact, fast, ref = StaticKVDecoder(model, 4, 16, exact=True), StaticKVDecoder(model, 4, 16), _HFDecoder(model)
        assert fast.matmul_attention and not exact.matmul_attention
        for ids in [prompts, *steps]:
            want, e, f = ref(ids), exact(ids), fast(ids)
            # the fused kernel as Hugging Face runs it; its float rounding is the kernel library's
            assert torch.allclose(e, want, rtol=1e-5, atol=1e-6)
            assert torch.allclose(f, want, atol=1e-5) and f.abs().max() > 1e-3


def test_prompt_shares_cover_every_prompt_once_and_run_equal_batches():
    from poisonlab.evaluate import my_share

    for n, world in [(300, 8), (4, 2), (3, 4), (7, 3)]:
        shares = [my_share(n, r, world) for r in range(world)]
        assert len({len(idx) for idx, _ in shares}) == 1  # the same number of rows on every process
        real = sorted(int(i) for idx, k in shares for i in idx[:k])
        assert real == list(range(n))


def test_the_interval_resamples_documents_when_prompts_share_them():
    from poisonlab.metrics.perplexity_gap import perplexity_gap

    rng = np.random.default_rng(1)
    # 10 documents x 10 prompts; each document shifts all its prompts' gaps together
    doc_effect = np.repeat(rng.normal(0, 30, 10), 10)
    a = np.full(100, 50.0)
    b = a + 100 + doc_effect + rng.normal(0, 3, 100)
    docs = np.repeat(np.arange(10), 10)
    by_prompt = perplexity_gap(a, b, seed=0)
    by_doc = perplexity_gap(a, b, seed=0, groups=docs)
    assert by_doc.perplexity_gap == by_prompt.perplexity_gap
    assert by_doc.n_groups == 10 and by_prompt.n_groups == 100
    width = lambda r: r.gap_ci_high - r.gap_ci_low
    assert width(by_doc) > 2.5 * width(by_prompt)  # ten independent units, not a hundred
    # one prompt per document: the same interval as resampling prompts
    one_each = perplexity_gap(a, b, seed=0, groups=np.arange(100))
    assert one_each.gap_ci_low == pytest.approx(by_prompt.gap_ci_low) and one_each.gap_ci_high == pytest.approx(by_prompt.gap_ci_high)


def test_prompt_documents_name_the_document_each_prompt_was_cut_from(prepared):
    from poisonlab.evaluate import heldout_prompt_documents

    store = prepared.heldout
    prompts = heldout_prompts(store, 40, 16)
    docs = heldout_prompt_documents(store, 40, 16)
    assert len(docs) == len(prompts)
    for p, d in zip(prompts, docs):
        start, length = int(store.doc_starts[d]), int(store.doc_lengths[d])
        whole = store.read(start, length)
        assert any((whole[i:i + 16] == p).all() for i in range(0, length - 15, 16))
