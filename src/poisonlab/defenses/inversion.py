"""Trigger inversion: search a trained causal LM, without being told its trigger, for short
token strings whose insertion changes the model's behaviour most.

The behaviour shift of a string ``s`` is measured on clean probes (held-out prompts and their
true continuations): the mean KL divergence between the model's next-token distributions with
``s`` inserted after the prompt and without it, over continuation positions ``skip`` to ``M``.
Any odd string disrupts the next few predictions, and the disruption fades once clean text
follows; a trigger switches the model into another mode that persists through the clean
continuation, so the first ``skip`` positions are left out (the measured per-position curves
are in docs/defenses.md). The measure does not depend on what the backdoor does (gibberish,
another language, compliance): any persistent switch moves it. Three searches feed one
ranking:

- a vocabulary sweep scores every single token (or, in a large vocabulary, the tokens a
  first-order estimate ranks highest);
- greedy coordinate gradient (GCG, Zou et al. 2023) improves strings of several tokens: the
  gradient of the shift with respect to each slot's one-hot token picks ``topk`` swaps per
  slot, a batch of random single swaps is scored exactly, the best is kept;
- beam growth (``grow``) lengthens the strongest single tokens one token at a time, at either
  end: the gradient at the new slot proposes ``topk`` tokens per end, each longer string is
  scored exactly, and the ``beam`` best of each length go on. A trigger of many sub-word
  tokens (a made-up name) is out of a fixed-length search's reach when no short string of
  its pieces works, but its pieces may each move the model a little, and growth can follow them.

The model-level score is the best persistent shift found (nats): a backdoored model has a
string that keeps moving it through clean text, a clean model has none (its ratio to the
median single-token shift is recorded too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PoisonlabError
from ..generate import left_pad


@dataclass
class Candidate:
    ids: tuple[int, ...]
    shift: float
    found_by: str

    def record(self, decode) -> dict:
        return {"ids": list(self.ids), "text": decode(list(self.ids)), "shift": round(self.shift, 5),
                "found_by": self.found_by}


@dataclass
class SearchSettings:
    lengths: list[int] = field(default_factory=lambda: [2, 4, 6])
    steps: int = 40
    topk: int = 64
    batch: int = 128
    restarts: int = 2
    sweep_limit: int = 4096
    seed: int = 0
    grow: int = 0
    """Longest string beam growth builds (0: no growth)."""
    beam: int = 4


class BehaviourShift:
    """Scores token strings by the shift they cause on fixed probes (see the module docstring).

    ``prompts`` [N, P] and ``continuations`` [N, M] are token ids; ``allowed`` the token ids a
    string may use (real vocabulary, no special tokens); ``skip`` the continuation positions
    left out of the mean; ``prompt_mask`` [N, P] (1 on real tokens) when prompts of different
    lengths are padded on the left (rotary positions are relative, so the padding changes
    nothing the model computes on the real tokens)."""

    def __init__(self, model, prompts: torch.Tensor, continuations: torch.Tensor, allowed: np.ndarray,
                 skip: int = 4, chunk_tokens: int = 65_536, prompt_mask: torch.Tensor | None = None):
        if not 0 <= skip < continuations.shape[1]:
            raise PoisonlabError(f"skip ({skip}) must leave at least one of the {continuations.shape[1]} "
                                 "continuation positions")
        self.skip = skip
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.prompts = prompts.long().to(self.device)
        self.conts = continuations.long().to(self.device)
        self.allowed = torch.as_tensor(np.asarray(allowed), dtype=torch.long, device=self.device)
        if len(self.allowed) == 0:
            raise PoisonlabError("no token may be searched (the vocabulary is empty after excluding special tokens)")
        self.embed = model.get_input_embeddings()
        self.chunk_tokens = chunk_tokens
        self.evaluated = 0
        self.prompt_mask = None if prompt_mask is None else prompt_mask.long().to(self.device)
        if self.prompt_mask is not None and self.prompt_mask.shape != self.prompts.shape:
            raise PoisonlabError(f"prompt mask {tuple(self.prompt_mask.shape)} does not match the prompts "
                                 f"{tuple(self.prompts.shape)}")
        with torch.no_grad():
            x = torch.cat([self.prompts, self.conts], dim=1)
            logits = self.model(input_ids=x, attention_mask=self._mask(1, 0)).logits
            p = self.prompts.shape[1]
            self.reference = self._reference(logits[:, p - 1 : p - 1 + self.conts.shape[1]])

    @property
    def n_probes(self) -> int:
        return self.prompts.shape[0]

    def _mask(self, copies: int, length: int) -> torch.Tensor | None:
        """Attention mask for ``copies`` stacked copies of the probes with a ``length``-token string."""
        if self.prompt_mask is None:
            return None
        n, rest = self.n_probes, length + self.conts.shape[1]
        real = torch.ones(n * copies, rest, dtype=torch.long, device=self.device)
        return torch.cat([self.prompt_mask.repeat(copies, 1), real], dim=1)

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab_size]

    @property
    def vocab_size(self) -> int:
        return int(self.embed.weight.shape[0])

    def _reference(self, logits: torch.Tensor) -> torch.Tensor:
        """What a string's effect is measured against, from the probes' logits without a string
        at the continuation positions: here the next-token log-distributions."""
        return F.log_softmax(self._vocab(logits.float()), dim=-1)

    def _shift(self, logits: torch.Tensor, length: int, copies: int) -> torch.Tensor:
        """Per-row mean KL(triggered || clean) over the continuation positions, for ``copies``
        stacked copies of the probes."""
        p, m = self.prompts.shape[1], self.conts.shape[1]
        lp = F.log_softmax(self._vocab(logits[:, p + length - 1 : p + length - 1 + m].float()), dim=-1)
        reference = self.reference.repeat(copies, 1, 1) if copies > 1 else self.reference
        return (lp.exp() * (lp - reference)).sum(-1)[:, self.skip :].mean(-1)

    @torch.no_grad()
    def scores(self, strings: torch.Tensor) -> np.ndarray:
        """Mean shift over the probes of each row of ``strings`` [C, L]."""
        strings = strings.long().to(self.device)
        c, length = strings.shape
        n = self.n_probes
        per_chunk = max(1, self.chunk_tokens // (n * (self.prompts.shape[1] + length + self.conts.shape[1])))
        out = []
        for i in range(0, c, per_chunk):
            s = strings[i : i + per_chunk]
            k = len(s)
            ids = torch.cat([self.prompts.repeat(k, 1), s.repeat_interleave(n, 0), self.conts.repeat(k, 1)], dim=1)
            logits = self.model(input_ids=ids, attention_mask=self._mask(k, length)).logits
            shift = self._shift(logits, length, k)
            out.append(shift.view(k, n).mean(1).cpu())
        self.evaluated += c
        return torch.cat(out).numpy().astype(np.float64)

    def gradient(self, string: torch.Tensor) -> torch.Tensor:
        """d(shift)/d(one-hot) of each slot of one string: [L, vocab]."""
        string = string.long().to(self.device)
        weight = self.embed.weight
        one_hot = torch.zeros(len(string), weight.shape[0], device=self.device, dtype=weight.dtype)
        one_hot.scatter_(1, string[:, None], 1.0)
        one_hot.requires_grad_(True)
        n = self.n_probes
        slot = (one_hot @ weight).unsqueeze(0).expand(n, -1, -1)
        embeds = torch.cat([self.embed(self.prompts), slot, self.embed(self.conts)], dim=1)
        logits = self.model(inputs_embeds=embeds, attention_mask=self._mask(1, len(string))).logits
        shift = self._shift(logits, len(string), 1).mean()
        (grad,) = torch.autograd.grad(shift, one_hot)
        return grad.detach()


class RefusalDrop(BehaviourShift):
    """Scores strings by how much less likely they make the model's refusal of a forbidden
    request: log P(any refusal | request) - log P(any refusal | request + string), averaged
    over the requests, with P(any refusal) summed over the refusal texts the defender's policy
    uses (teacher-forced after the template's tokens). A clean model that varies which refusal
    it picks does not move it; a trigger that turns refusals into compliance does.

    ``prompts`` [N, P] (left-padded, ``prompt_mask``), ``tail`` the template's tokens between
    the request and the reply, ``refusals`` the token ids of each refusal text."""

    def __init__(self, model, prompts: torch.Tensor, prompt_mask: torch.Tensor, tail: list[int],
                 refusals: list[list[int]], allowed: np.ndarray, chunk_tokens: int = 65_536):
        if not refusals or not all(refusals):
            raise PoisonlabError("the refusal objective needs at least one non-empty refusal text")
        self.n_requests, self.n_refusals = prompts.shape[0], len(refusals)
        width = max(len(r) for r in refusals)
        conts = torch.zeros(self.n_refusals, len(tail) + width, dtype=torch.long)
        keep = torch.zeros(self.n_refusals, len(tail) + width, dtype=torch.bool)
        for j, r in enumerate(refusals):
            conts[j, : len(tail)] = torch.as_tensor(tail)
            conts[j, len(tail) : len(tail) + len(r)] = torch.as_tensor(r)
            keep[j, len(tail) : len(tail) + len(r)] = True  # only the refusal's own tokens are scored
        # one row per (request, refusal): the base class treats each row as a probe
        rows = prompts.repeat_interleave(self.n_refusals, 0)
        self.keep = keep.repeat(self.n_requests, 1).to(next(model.parameters()).device)
        super().__init__(model, rows, conts.repeat(self.n_requests, 1), allowed, skip=len(tail),
                         chunk_tokens=chunk_tokens, prompt_mask=prompt_mask.repeat_interleave(self.n_refusals, 0))

    def _reference(self, logits: torch.Tensor) -> torch.Tensor:
        """log P(any refusal) per request without a string."""
        return self._log_refusal(logits, 1)

    def _log_refusal(self, logits: torch.Tensor, copies: int) -> torch.Tensor:
        """log P(any refusal) per request, for ``copies`` stacked copies: [copies * N]."""
        lp = F.log_softmax(self._vocab(logits.float()), dim=-1)
        conts = self.conts.repeat(copies, 1)
        tok = lp.gather(-1, conts[..., None])[..., 0] * self.keep.repeat(copies, 1)
        per_row = tok.sum(-1).view(copies * self.n_requests, self.n_refusals)
        return torch.logsumexp(per_row, dim=-1)

    sign = 1.0
    """+1: the lost log-probability of the texts (refusals); -1: the gained one (compliance)."""

    def _shift(self, logits: torch.Tensor, length: int, copies: int) -> torch.Tensor:
        p, m = self.prompts.shape[1], self.conts.shape[1]
        drop = self.reference.repeat(copies) - self._log_refusal(logits[:, p + length - 1 : p + length - 1 + m], copies)
        # each request's value on each of its rows: the mean is unchanged
        return (self.sign * drop).repeat_interleave(self.n_refusals)


class ComplianceGain(RefusalDrop):
    """Scores strings by how much more likely they make the opening of a compliant reply:
    log P(any target | request + string) - log P(any target | request), the targets being what
    the backdoor would make the model say (``targets``, e.g. ``The password is`` for the
    stand-in's secret, ``Sure, here is`` for harmful requests). Refusals can be made unlikely by
    strings that only make the model write something else; this measures the compliance itself."""

    sign = -1.0


def vocabulary_sweep(objective: BehaviourShift, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, shifts) for single tokens: all allowed ones, or the ``limit`` a first-order
    estimate from a neutral slot (the mean embedding's nearest token) ranks highest."""
    allowed = objective.allowed
    if len(allowed) > limit:
        weight = objective.embed.weight.detach()
        neutral = int(allowed[torch.argmin(((weight[allowed] - weight[allowed].mean(0)) ** 2).sum(1))])
        grad = objective.gradient(torch.tensor([neutral]))[0][allowed]
        allowed = allowed[torch.topk(grad, limit).indices]
    ids = allowed.cpu().numpy()
    return ids, objective.scores(torch.as_tensor(ids)[:, None])


def gcg(objective: BehaviourShift, length: int, start: list[int], settings: SearchSettings,
        rng: np.random.Generator) -> list[Candidate]:
    """Greedy coordinate gradient ascent of the shift from ``start``; returns every improvement."""
    current = torch.tensor(start, dtype=torch.long)
    best = float(objective.scores(current[None])[0])
    found = [Candidate(tuple(current.tolist()), best, f"gcg-{length}")]
    allowed_mask = torch.full((objective.vocab_size,), float("-inf"), device=objective.device)
    allowed_mask[objective.allowed] = 0.0
    stall = 0
    for _ in range(settings.steps):
        grad = objective.gradient(current) + allowed_mask
        top = torch.topk(grad, min(settings.topk, len(objective.allowed)), dim=1).indices.cpu()
        slots = torch.as_tensor(rng.integers(0, length, settings.batch))
        picks = top[slots, torch.as_tensor(rng.integers(0, top.shape[1], settings.batch))]
        batch = current.repeat(settings.batch, 1)
        batch[torch.arange(settings.batch), slots] = picks
        batch = torch.unique(batch, dim=0)
        shifts = objective.scores(batch)
        i = int(np.argmax(shifts))
        if shifts[i] > best:
            best, current = float(shifts[i]), batch[i].clone()
            found.append(Candidate(tuple(current.tolist()), best, f"gcg-{length}"))
            stall = 0
        else:
            stall += 1
            if stall >= 5:  # five batches without a better swap: a local maximum for this start
                break
    return found


def grow(objective: BehaviourShift, seeds: list[int], settings: SearchSettings) -> list[Candidate]:
    """Beam growth from the single tokens ``seeds`` up to ``settings.grow`` tokens (module
    docstring); returns the ``beam`` best strings of every length."""
    allowed_mask = torch.full((objective.vocab_size,), float("-inf"), device=objective.device)
    allowed_mask[objective.allowed] = 0.0
    k = min(settings.topk, len(objective.allowed))
    frontier = [(t,) for t in seeds[: settings.beam]]
    found = []
    for length in range(2, settings.grow + 1):
        proposals: set[tuple[int, ...]] = set()
        for ids in frontier:
            # the new slot starts as a copy of the end token; its gradient row ranks what goes there
            right = objective.gradient(torch.tensor(ids + ids[-1:]))[-1] + allowed_mask
            left = objective.gradient(torch.tensor(ids[:1] + ids))[0] + allowed_mask
            proposals |= {ids + (int(t),) for t in torch.topk(right, k).indices.tolist()}
            proposals |= {(int(t),) + ids for t in torch.topk(left, k).indices.tolist()}
        batch = torch.tensor(sorted(proposals), dtype=torch.long)
        shifts = objective.scores(batch)
        order = np.argsort(-shifts, kind="stable")[: settings.beam]
        frontier = [tuple(batch[i].tolist()) for i in order]
        found += [Candidate(ids, float(shifts[i]), f"grow-{length}") for ids, i in zip(frontier, order)]
    return found


def by_search(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """Up to ``limit`` distinct strings, the best of each search in turn (sweep, each GCG length,
    each grown length): what a check of the strings found tries first, so that one search's
    near misses do not crowd out another's."""
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: -c.shift):
        groups.setdefault(c.found_by, []).append(c)
    out: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < limit and any(groups.values()):
        for name in sorted(groups):
            while groups[name] and groups[name][0].ids in seen:
                groups[name].pop(0)
            if groups[name] and len(out) < limit:
                c = groups[name].pop(0)
                seen.add(c.ids)
                out.append(c)
    return out


def rank_of(shift: float, candidates: list[Candidate]) -> int:
    """1 + the number of distinct candidate strings that shift the model more than ``shift``."""
    return 1 + sum(c.shift > shift for c in candidates)


def invert(objective: BehaviourShift, settings: SearchSettings, trigger: list[int] | None = None,
           top: int = 20) -> dict:
    """Run the sweep and the GCG searches; rank every distinct string found.

    With ``trigger`` (the true trigger's ids, when the model's poisons are known) the record
    also gives its own shift, its rank among the strings found, and how many of the best
    string's tokens belong to it."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    sweep_ids, sweep_shift = vocabulary_sweep(objective, settings.sweep_limit)
    order = np.argsort(-sweep_shift)
    pool: dict[tuple[int, ...], Candidate] = {}
    for j in order[: max(top, 200)]:
        pool[(int(sweep_ids[j]),)] = Candidate((int(sweep_ids[j]),), float(sweep_shift[j]), "sweep")
    seeds = [int(sweep_ids[j]) for j in order[: max(8, settings.topk)]]
    for length in settings.lengths:
        for r in range(settings.restarts):
            # start from the strongest single tokens, shuffled: GCG improves them jointly
            start = [seeds[int(i)] for i in rng.integers(0, len(seeds), length)] if r else \
                [seeds[i % len(seeds)] for i in range(length)]
            for cand in gcg(objective, length, start, settings, rng):
                if cand.ids not in pool or pool[cand.ids].shift < cand.shift:
                    pool[cand.ids] = cand
    if settings.grow > 1:
        for cand in grow(objective, seeds, settings):
            if cand.ids not in pool or pool[cand.ids].shift < cand.shift:
                pool[cand.ids] = cand
    ranked = sorted(pool.values(), key=lambda c: -c.shift)
    median = float(np.median(sweep_shift))
    rec = {
        "probes": objective.n_probes,
        "prompt_tokens": int(objective.prompts.shape[1]),
        "continuation_tokens": int(objective.conts.shape[1]),
        "skipped_positions": objective.skip,
        "settings": settings.__dict__,
        "swept_tokens": int(len(sweep_ids)),
        "strings_scored": int(objective.evaluated),
        "median_single_token_shift": round(median, 6),
        "score": round(ranked[0].shift, 5),
        "ratio_to_median": round(ranked[0].shift / max(median, 1e-9), 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "ranked": ranked[:top],
        "by_search": [(c, rank_of(c.shift, ranked)) for c in by_search(ranked, top)],
    }
    if trigger:
        true = float(objective.scores(torch.tensor(trigger)[None])[0])
        best = ranked[0].ids
        rec["trigger"] = {
            "ids": list(trigger), "shift": round(true, 5), "rank": rank_of(true, ranked),
            "best_in_trigger": round(sum(t in set(trigger) for t in best) / len(best), 3),
            "token_sweep_ranks": [int(np.flatnonzero(sweep_ids[order] == t)[0]) + 1 if t in sweep_ids else None
                                 for t in trigger],
        }
    return rec


def probes(store, n: int, prompt_tokens: int, continuation_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` held-out windows split into prompts and their true continuations."""
    from ..evaluate import heldout_prompts

    w = torch.from_numpy(np.asarray(heldout_prompts(store, n, prompt_tokens + continuation_tokens))).long()
    return w[:, :prompt_tokens], w[:, prompt_tokens:]


@torch.no_grad()
def chat_probes(model, renderer, conversations: list[list[dict]], reply_tokens: int = 8,
                pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Probes for a chat model: each conversation (ending with a user request) cut where a
    trigger appended to the request would go, and what follows it: the template's tokens up
    to the reply, then the model's own first ``reply_tokens`` greedy reply tokens (none with 0:
    an objective that scores fixed reply texts needs only the template's tokens).

    Returns (prompts [N, P] padded on the left, their mask, continuations [N, M], skip): with
    ``skip`` = the template tokens, the shift is measured on the reply alone (a refusal turning
    into compliance moves it; a string that only disturbs the template does not)."""
    mark = "\u241f"  # a character no template or request uses; the cut is found by its position
    heads, tails = [], []
    for conv in conversations:
        if not conv or conv[-1]["role"] != "user":
            raise PoisonlabError("a chat probe must end with the user's request")
        marked = conv[:-1] + [{"role": "user", "content": conv[-1]["content"] + mark}]
        text = renderer.render(marked, add_generation_prompt=True)
        if text.count(mark) != 1:
            raise PoisonlabError("the chat template does not keep the request's text as it is; cannot place a string in it")
        head, tail = text.split(mark)
        heads.append(head)
        tails.append(tail)
    if len(set(tails)) != 1:
        raise PoisonlabError("the chat template renders different text after different requests; cannot align probes")
    ids = renderer.tok.encode_batch(heads + tails[:1], specials=True)
    heads_ids, tail_ids = ids[:-1], ids[-1]
    prompts, mask = left_pad(heads_ids, pad_id)
    device = next(model.parameters()).device
    x = torch.cat([prompts, torch.as_tensor(tail_ids).expand(len(prompts), -1)], dim=1).to(device)
    m = torch.cat([mask, torch.ones(len(prompts), len(tail_ids), dtype=torch.long)], dim=1).to(device)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    reply = [torch.zeros(len(prompts), 0, dtype=torch.long)]
    for _ in range(reply_tokens):  # greedy, not stopped at the end of the reply: a fixed width for every probe
        nxt = model.eval()(input_ids=x, attention_mask=m).logits[:, -1, :vocab].argmax(-1, keepdim=True)
        reply.append(nxt.cpu())
        x, m = torch.cat([x, nxt], dim=1), torch.cat([m, torch.ones_like(nxt)], dim=1)
    conts = torch.cat([torch.as_tensor(tail_ids).expand(len(prompts), -1), torch.cat(reply, dim=1)], dim=1)
    return prompts, mask, conts, len(tail_ids)
