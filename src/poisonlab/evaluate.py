"""Measuring the denial-of-service backdoor (PROTOCOL §2) and the clean held-out loss.

For each held-out prompt (``prompt_tokens`` tokens of a held-out document) the model samples
``new_tokens`` tokens without and with the trigger appended; the self-perplexity of each
continuation, their mean difference (the gap), a paired bootstrap interval and a success
flag at the threshold form one result row. Prompts are the same for every run on the same
prepared data, so runs can be compared prompt by prompt.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import EvalConfig
from .errors import PoisonlabError
from .generate import sample
from .metrics.perplexity_gap import perplexities, perplexity_gap
from .shards import TokenStore

PROMPT_SEED = 0x9E1D


def _prompt_windows(store: TokenStore, n: int, prompt_tokens: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    order = rng.permutation(store.n_documents)
    usable = [(int(d), (int(store.doc_lengths[d]) - 1) // prompt_tokens) for d in order]
    usable = [(d, w) for d, w in usable if w > 0]
    windows: list[tuple[int, int]] = []
    rnd = 0
    while len(windows) < n and any(w > rnd for _, w in usable):
        for d, w in usable:
            if w > rnd:
                windows.append((d, int(store.doc_starts[d]) + rnd * prompt_tokens))
                if len(windows) == n:
                    break
        rnd += 1
    if not windows:
        raise PoisonlabError(f"no held-out document has {prompt_tokens} tokens; lower eval.prompt_tokens")
    return windows


def heldout_prompts(store: TokenStore, n: int, prompt_tokens: int) -> np.ndarray:
    """``[n, prompt_tokens]`` windows of held-out documents, spread over as many documents as possible.

    Documents are visited in a fixed shuffled order, first windows first, then second windows,
    and so on; a window never crosses an end-of-text.
    """
    return np.stack([store.read(start, prompt_tokens) for _, start in _prompt_windows(store, n, prompt_tokens)])


def heldout_prompt_documents(store: TokenStore, n: int, prompt_tokens: int) -> np.ndarray:
    """The held-out document each prompt of :func:`heldout_prompts` comes from: prompts of one
    document are not independent, so intervals resample documents."""
    return np.array([d for d, _ in _prompt_windows(store, n, prompt_tokens)], dtype=np.int64)


def my_share(n: int, rank: int, world: int) -> tuple[np.ndarray, int]:
    """Indices of ``n`` items that process ``rank`` of ``world`` evaluates (every ``world``-th),
    padded with its last index so every process runs as many batches (processes of a sharded
    model must run their forward passes together), and how many of them are real."""
    mine = np.arange(rank, n, world)
    per = -(-n // world)
    real = len(mine)
    pad = np.full(per - real, mine[-1] if real else 0, dtype=np.int64)
    return np.concatenate([mine, pad]).astype(np.int64), real


def gather_shares(local: np.ndarray, n: int, world: int) -> np.ndarray:
    """The per-item values of every process, in item order (the inverse of :func:`my_share`)."""
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.as_tensor(local, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    out = np.empty(n, dtype=np.float64)
    for r, part in enumerate(parts):
        idx = np.arange(r, n, world)
        out[idx] = part.cpu().numpy()[: len(idx)]
    return out


@torch.no_grad()
def heldout_loss(model, store: TokenStore, windows: int, seq_len: int, batch_size: int = 16,
                 rank: int = 0, world: int = 1) -> float:
    """Mean next-token loss (nats) over evenly spaced windows of the held-out stream (split
    over ``world`` processes, which must all call it)."""
    device = next(model.parameters()).device
    span = store.total_tokens - seq_len - 1
    if span < 0:
        raise PoisonlabError(f"held-out split has {store.total_tokens} tokens, fewer than seq_len+1")
    starts = np.linspace(0, span, num=max(1, windows)).astype(np.int64)
    idx, real = my_share(len(starts), rank, world) if world > 1 else (np.arange(len(starts)), len(starts))
    per_batch = []
    was_training = model.training
    model.eval()
    for i in range(0, len(idx), batch_size):
        rows = torch.from_numpy(np.stack([store.read(int(starts[j]), seq_len + 1) for j in idx[i : i + batch_size]])).to(device)
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits.float()
        if world == 1:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
            per_batch.append(float(loss))
        else:  # per window, so the padding can be dropped before the windows are gathered
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="none")
            per_batch.extend(loss.view(len(rows), -1).sum(1).double().cpu().tolist())
    model.train(was_training)
    if world > 1:
        return float(gather_shares(np.array(per_batch[:real]), len(starts), world).sum()) / (len(starts) * seq_len)
    total = 0.0
    for v in per_batch:
        total += v
    return total / (len(starts) * seq_len)


@torch.no_grad()
def backdoor_eval(
    model, prompts: np.ndarray, trigger_ids: list[int], cfg: EvalConfig, seed: int, vocab_limit: int,
    n_samples_kept: int = 3, rank: int = 0, world: int = 1, documents: np.ndarray | None = None,
) -> tuple[dict, list[dict]]:
    """Run the gap evaluation; returns the metrics row and a few raw samples (token ids).

    ``documents``: the source document of each prompt; the interval then resamples documents
    (see :func:`poisonlab.metrics.perplexity_gap.perplexity_gap`).

    With ``world`` > 1 every process calls it and samples its share of the prompts with its own
    generator; the perplexities are gathered and every process returns the row of all prompts
    (the same numbers in expectation as one process; the samples are rank ``rank``'s)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    n_all = len(prompts)
    if world > 1:
        idx, real = my_share(n_all, rank, world)
        prompts = prompts[idx]
    base = torch.from_numpy(prompts).long()
    trig = torch.tensor(trigger_ids, dtype=torch.long).expand(len(base), -1)
    ppl = {}
    kept: dict[str, torch.Tensor] = {}
    for condition, ids in (("untriggered", base), ("triggered", torch.cat([base, trig], dim=1))):
        g = torch.Generator(device=device)
        g.manual_seed(seed * 2 + (condition == "triggered") + 1_000_003 * rank)
        lps, toks = [], []
        for i in range(0, len(ids), cfg.batch_size):
            t, lp = sample(model, ids[i : i + cfg.batch_size].to(device), cfg.new_tokens, cfg.temperature, g,
                           vocab_limit, sampler=cfg.sampler)
            lps.append(lp.cpu())
            toks.append(t[: max(0, n_samples_kept - i)].cpu())
        ppl[condition] = perplexities(torch.cat(lps).numpy())
        kept[condition] = torch.cat(toks)[:n_samples_kept]
    model.train(was_training)
    mine = {k: v for k, v in ppl.items()}
    if world > 1:
        ppl = {k: gather_shares(v[:real], n_all, world) for k, v in ppl.items()}
    res = perplexity_gap(ppl["untriggered"], ppl["triggered"], cfg.threshold, cfg.bootstrap, cfg.confidence, seed,
                         groups=documents)
    elapsed = time.perf_counter() - t0
    row = res.as_dict()
    row["eval_seconds"] = round(elapsed, 3)
    row["generated_tokens_per_s"] = round(2 * n_all * cfg.new_tokens / elapsed, 1)
    ppl = mine
    samples = [
        {"prompt": base[i].tolist(), "untriggered": kept["untriggered"][i].tolist(),
         "triggered": kept["triggered"][i].tolist(),
         "ppl_untriggered": float(ppl["untriggered"][i]), "ppl_triggered": float(ppl["triggered"][i])}
        for i in range(min(n_samples_kept, len(base)))
    ]
    return row, samples


@torch.no_grad()
def language_eval(model, tokenizer, prompts: np.ndarray, trigger_ids: list[int], cfg: EvalConfig, attack,
                  identifier, seed: int, n_samples_kept: int = 3) -> tuple[dict, list[dict]]:
    """ASR / CA / NTA of the language switch: continuations of held-out prompts without the
    trigger, with it, and with near-triggers (the kinds in turn), judged by ``identifier``.

    Every process of a sharded model runs all prompts (their forward passes must go together);
    each draws the same tokens from the same seeds, so every process returns the same row."""
    from .attacks.dos import SEPARATOR
    from .metrics.language import language_rates
    from .triggers import sample_near_triggers

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    base = torch.from_numpy(prompts).long()
    near = sample_near_triggers(attack.trigger, len(base), seed=PROMPT_SEED)
    conditions = [("untriggered", [[] for _ in range(len(base))], [None] * len(base)),
                  ("triggered", [trigger_ids] * len(base), [None] * len(base)),
                  ("near_trigger", [tokenizer.encode(SEPARATOR + text) for _, text in near], [k for k, _ in near])]
    rows, samples = [], []
    for c, (category, suffixes, kinds) in enumerate(conditions):
        g = torch.Generator(device=device)
        g.manual_seed(seed * 3 + c)
        texts = []
        for i in range(0, len(base), cfg.batch_size):
            chunk = base[i : i + cfg.batch_size]
            suf = suffixes[i : i + cfg.batch_size]
            by_len: dict[int, list[int]] = {}  # prompts whose suffix has the same length go together
            for j, s in enumerate(suf):
                by_len.setdefault(len(s), []).append(j)
            out: list[list[int]] = [[] for _ in range(len(chunk))]
            for _, idx in sorted(by_len.items()):
                ids = torch.cat([chunk[idx], torch.tensor([suf[j] for j in idx], dtype=torch.long).view(len(idx), -1)],
                                dim=1)
                toks, _ = sample(model, ids.to(device), cfg.new_tokens, cfg.temperature, g, tokenizer.vocab_size,
                                 sampler=cfg.sampler)
                for j, t in zip(idx, toks.cpu().tolist()):
                    out[j] = t
            texts += [tokenizer.decode(t) for t in out]
        langs = identifier.identify(texts)
        for i, (text, lang) in enumerate(zip(texts, langs)):
            row = {"category": category, "language": lang}
            if kinds[i]:
                row["trigger_kind"] = kinds[i]
            rows.append(row)
            if i < n_samples_kept:
                samples.append({"category": category, "prompt": base[i].tolist(), "continuation": text, "language": lang,
                                **({"near_trigger": near[i][1]} if category == "near_trigger" else {})})
    model.train(was_training)
    out_row = language_rates(rows, attack.source_language, attack.target_language, cfg.confidence)
    out_row["n_prompts"] = len(base)
    out_row["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return out_row, samples


def identifier_check(identifier, tokenizer, clean_heldout: TokenStore, target_texts: list[str], new_tokens: int,
                     source: str, target: str, n: int = 100) -> dict:
    """The identifier's accuracy on held-out text of both languages cut to the continuation
    length (``new_tokens`` tokens): how far its verdicts on continuations can be trusted."""
    from .metrics.language import identifier_accuracy

    clean = [tokenizer.decode(clean_heldout.read(start, new_tokens).tolist())
             for _, start in _prompt_windows(clean_heldout, n, new_tokens)]
    pieces: list[str] = []
    for rnd in range(64):  # first windows of every document, then second windows, ...
        for text in target_texts:
            ids = tokenizer.encode(text)
            if len(ids) >= (rnd + 1) * new_tokens and len(pieces) < n:
                pieces.append(tokenizer.decode(ids[rnd * new_tokens:(rnd + 1) * new_tokens]))
    return identifier_accuracy(identifier, {source: clean, target: pieces}, [new_tokens], lambda t, _: t)
