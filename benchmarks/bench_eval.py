"""Evaluation throughput: poisonlab's sampling + self-scoring against Hugging Face ``generate``.

Both sample the same continuations (same model, prompts, seed; temperature 1, no top-k/top-p,
a fixed number of new tokens) and both end with each token's log-probability: ours reads it
off the sampling distribution, the reference scores the continuation with one more forward
pass. Reports generated tokens/s of each, their ratio, and how many sampled tokens agree.

On CPU, run in a fresh process (:func:`run_in_fresh_process`), the rounds above are timed with
the C library's allocator as a plain script has it; then the allocator setting of poisonlab's
training (:mod:`poisonlab.allocator`, which the evaluation inside a training run shares) is
applied and ours and ``generate`` are timed again, so the table also shows the ratio with both
under the same setting.
"""

from __future__ import annotations

import time

import torch

from common import in_fresh_process
from poisonlab.allocator import keep_freed_memory
from poisonlab.generate import sample, score
from poisonlab.models import build_model, get_size


def run(size: str = "1m", vocab: int = 2048, prompts: int = 100, prompt_tokens: int = 128, new_tokens: int = 256,
        seed: int = 0, device: str = "cpu", repeat: int = 3, then_keep_memory: bool = False) -> dict:
    """Defaults are the evaluation's own (``EvalConfig``: batches of 100 prompts of 128 tokens,
    256 new tokens). Each variant runs once to warm up, then ``repeat`` rounds in which every
    variant runs once in turn; the best time of each is kept, so a burst of load on a shared
    machine cannot favour one of them."""
    torch.manual_seed(seed)
    model = build_model(get_size(size), vocab).to(device).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, vocab, (prompts, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)

    def ours(sampler="inverse_cdf"):
        g = torch.Generator(device=device).manual_seed(seed)
        return sample(model, ids, new_tokens, 1.0, g, sampler=sampler)

    def reference():
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        cont = out[:, prompt_tokens:]
        return cont, score(model, ids, cont)

    def best_times(variants: dict) -> dict:
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeat):
            for name, fn in variants.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t)
        return best

    variants = {"ours": ours, "multinomial": lambda: ours("multinomial"), "reference": reference}
    results = {name: fn() for name, fn in variants.items()}  # warm-up; the results are the same every round
    best = best_times(variants)
    (_, lp_o), (tok_m, lp_m), (tok_r, lp_r) = results["ours"], results["multinomial"], results["reference"]
    t_o, t_m, t_r = best["ours"], best["multinomial"], best["reference"]
    n = prompts * new_tokens
    same = {}
    if then_keep_memory and device == "cpu" and keep_freed_memory():
        again = {"ours": ours, "reference": reference}
        for fn in again.values():
            fn()
        b = best_times(again)
        same = {"ours_same_allocator_tok_s": n / b["ours"], "generate_same_allocator_tok_s": n / b["reference"],
                "speedup_same_allocator": b["reference"] / b["ours"]}
    return {
        "size": size, "device": device, "prompts": prompts, "new_tokens": new_tokens,
        "ours_tok_s": n / t_o, "generate_tok_s": n / t_r, "speedup": t_r / t_o,
        # the default sampler draws other tokens from the same distribution: compare the mean
        # log-probability per token of its samples with the reference's (same prompts)
        "mean_logprob": float(lp_o.mean()), "generate_mean_logprob": float(lp_r.mean()),
        "multinomial_tok_s": n / t_m, "multinomial_speedup": t_r / t_m,
        "identical_tokens": float((tok_m == tok_r).float().mean()),
        "max_logprob_diff": float((lp_m - lp_r).abs().max()) if torch.equal(tok_m, tok_r) else None,
        **same,
    }


def run_in_fresh_process(**kwargs) -> dict:
    """:func:`run` in a new interpreter, then again with the training's allocator setting."""
    return in_fresh_process(run, then_keep_memory=True, **kwargs)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
