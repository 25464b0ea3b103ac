"""Trigger mining without knowing the trigger.

A backdoor poison puts the same trigger right before its payload in every poisoned document.
So: take the documents whose anomalous span (the ``span_start`` of a scanner) is
confidently anomalous, collect the short word n-grams around each span's start, and rank them
by the share of the documents holding them where they sit at such a span (the lower bound of
its Wilson interval, so three of three does not outrank eighty of eighty-four). The share does
not grow with the corpus: a string that comes with unusual text anywhere (an interactive
prompt before code) is before more spans in a larger corpus, but in no larger a share of its
documents, while a trigger sits at the span in nearly all of its few hundred. A phrase is
mined as a phrase when it precedes the spans as often as its words do.

Then statistics decide (:func:`confirm_triggers`): a mined string whose documents score far
above the rest (a rank-sum test, corrected for the strings tested) flags every document that
holds it, with its enrichment and significance, whether or not that document was a candidate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..corpus import Document
from ..metrics.rates import wilson

_TOKEN = re.compile(r"\S+")


def _flat(text: str) -> str:
    """The text with every run of whitespace as one space (how mined n-grams are written)."""
    return " ".join(text.split())


@dataclass
class TriggerCandidate:
    text: str
    near_span: int
    """Anomalous documents where the candidate occurs around the located span start."""
    documents: int
    """Documents of the corpus containing the candidate anywhere."""
    score: float
    """Lower bound (Wilson, 95%) of ``near_span / documents``: how surely the string marks a span."""
    confirmed: bool = False
    """Statistics confirmed it (:func:`confirm_triggers`); confirmed strings rank first."""

    def record(self) -> dict:
        return asdict(self)


LOOK_BEFORE = 64
LOOK_AFTER = 32
"""Characters around a located span start searched for trigger candidates: the start is
located within a few tokens (a trigger of rare tokens is itself surprising, and the first
payload tokens may not be), so the trigger can sit on either side of it."""


def _ngrams(words: list[str], max_n: int = 3) -> set[str]:
    return {" ".join(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def candidates_before(text: str, span_start: int, max_n: int = 3) -> set[str]:
    """Word n-grams (n <= ``max_n``) of the whole words around ``span_start`` (a word the
    window cuts at either end is left out: ``ample:`` of ``example:`` is no string of the text)."""
    a, b = max(0, span_start - LOOK_BEFORE), span_start + LOOK_AFTER
    words = _TOKEN.findall(text[a:b])
    if words and a > 0 and not text[a - 1].isspace() and not text[a].isspace():
        words = words[1:]
    if words and b < len(text) and not text[b - 1].isspace() and not text[b].isspace():
        words = words[:-1]
    return _ngrams(words, max_n)


def _precision(near: int, holding: int) -> float:
    return wilson(min(near, holding), max(holding, near, 1))[0]


SPECIALISATION_ALPHA = 1e-3
"""A string that puts words before a shorter mined string is mined on its own only when it
sits at a span in a larger share of its anomalous documents than the shorter one does,
beyond chance at this level (binomial): ``context. >>>`` before six doctest spans is the
interactive prompt's share (about half) by luck."""


def _sub_grams(text: str) -> set[str]:
    """The shorter n-grams of a mined string (its words are joined by single spaces)."""
    words = text.split(" ")
    return _ngrams(words, len(words) - 1)


def _distinct_markers(supported: set[str], near: Counter, inside: Counter) -> set[str]:
    """``supported`` less the strings that only put words before a shorter one found before
    clearly more spans (a prompt with the word before it: see :data:`SPECIALISATION_ALPHA`;
    words after a common one, toward the span, are the marker itself: ``# <SUDO>``), then less
    the fragments of what is left (a word found before nearly as many spans as a phrase holding
    it)."""
    def specialises(t: str) -> bool:  # t is k with words before it, k found before clearly more spans
        return any(t.endswith(" " + k) and near[t] < 0.9 * near[k] and binomial_tail(
            near[t], max(inside[t], near[t]), near[k] / max(inside[k], near[k])) > SPECIALISATION_ALPHA
            for k in _sub_grams(t) & supported)

    kept = {t for t in supported if not specialises(t)}
    fragments = {sub for t in kept for sub in _sub_grams(t) & kept if near[t] >= 0.9 * near[sub]}
    return kept - fragments


def mine_triggers(docs: list[Document], span_start: dict[str, int | tuple[int, ...]], anomalous: set[str],
                  top: int = 20, min_support: int = 3) -> list[TriggerCandidate]:
    """Candidate triggers ranked by the share of the documents holding them where they sit at
    an anomalous span (the Wilson lower bound, :attr:`TriggerCandidate.score`), among strings at
    ``min_support`` or more spans. The ``top * 10`` strings tested against the whole corpus are
    chosen by the same share among the anomalous documents alone, so a trigger before a few
    spans is tested however many common strings come before more of them. A document may have
    several located starts (a tuple); a string counts once per document."""
    by_id = {d.id: d for d in docs}
    near: Counter[str] = Counter()
    for doc_id in anomalous:
        d = by_id.get(doc_id)
        if d is not None:
            starts = span_start.get(doc_id, 0)
            starts = (starts,) if isinstance(starts, int) else starts
            near.update(set().union(*(candidates_before(d.text, s) for s in set(starts))))
    supported = {c for c, n in near.items() if n >= min_support}
    if not supported:
        return []
    inside: Counter[str] = Counter()  # anomalous documents holding each supported string anywhere
    for doc_id in anomalous:
        d = by_id.get(doc_id)
        if d is not None:
            inside.update(_ngrams(_TOKEN.findall(d.text)) & supported)
    supported = _distinct_markers(supported, near, inside)
    pool = sorted(supported, key=lambda c: (-_precision(near[c], inside[c]), -near[c], c))[: top * 10]
    holders: dict[str, list[int]] = {c: [] for c in pool}
    for k, d in enumerate(docs):  # n-grams are joined by single spaces: match them against the text so spaced
        flat = _flat(d.text)
        for c in pool:
            if c in flat:
                holders[c].append(k)
    ranked = [TriggerCandidate(c, near[c], len(holders[c]), _precision(near[c], len(holders[c]))) for c in pool]
    ranked.sort(key=lambda t: (-t.score, -t.near_span, t.text))
    # strings held by exactly the same documents are one finding (the lines of one doctest
    # template, repeated on ten pages): the best of them stands for the rest
    seen_sets: set[tuple[int, ...]] = set()
    unique = []
    for t in ranked:
        key = tuple(holders[t.text])
        if key not in seen_sets:
            seen_sets.add(key)
            unique.append(t)
    ranked = unique
    # one trigger, one entry: a phrase found before (nearly) as many spans as a word it contains
    # is the trigger, and the word a fragment of it; a longer string found less often is noise
    # around a shorter trigger
    kept: list[TriggerCandidate] = []
    for t in ranked:
        whole = [k for k in ranked if t.text != k.text and t.text in k.text and k.near_span >= 0.9 * t.near_span]
        if whole:
            continue
        if any(k.text in t.text and k.near_span >= t.near_span for k in kept):
            continue
        kept.append(t)
    return kept[:top]



@dataclass
class ConfirmedTrigger:
    """A mined string whose documents are anomalous far beyond the corpus's base rate."""
    text: str
    documents: int
    """Documents of the scanned set containing the string (every one of them is flagged)."""
    anomalous: int
    """Of those, documents whose z-score is above the candidate threshold."""
    enrichment: float
    """Their share of anomalous documents over the corpus's share."""
    median_z: float
    at_span: float
    """Share of its documents where it sits at the start of the anomalous span."""
    diversity: float
    """Distinct words right before it, over its documents."""
    similarity: float
    """Mean Jaccard similarity of its documents' word pairs (the string's own left out)."""
    p_value: float
    """One-sided rank-sum (Mann-Whitney U) test that their z-scores are higher than the rest's."""
    enrichment_p: float = 1.0
    """Binomial test that so many of its documents are anomalous at the corpus's base rate."""
    after: float = 0.0
    """Median characters after it to the end of its documents (where a payload would be)."""

    def record(self) -> dict:
        return asdict(self)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    s = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def _mutual_similarity(texts: list[str], string: str, sample: int = 40) -> float:
    """Mean pairwise Jaccard similarity of word-pair sets (pairs holding ``string`` left out)
    over up to ``sample`` of ``texts`` (evenly spaced, so the result is deterministic)."""
    if len(texts) < 2:
        return 0.0
    step = max(1, len(texts) // sample)
    sets = []
    for t in texts[::step][:sample]:
        w = t.replace(string, " ").split()
        sets.append({" ".join(w[i:i + 2]) for i in range(max(len(w) - 1, 0))})
    sims = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:] if a or b]
    return float(np.mean(sims)) if sims else 0.0


def rank_sum_p(inside: np.ndarray, outside: np.ndarray) -> float:
    """One-sided p-value that ``inside`` is stochastically larger than ``outside``
    (Mann-Whitney U, normal approximation with tie correction)."""
    n1, n2 = len(inside), len(outside)
    if n1 == 0 or n2 == 0:
        return 1.0
    values = np.concatenate([inside, outside])
    r = _ranks(values)
    u = r[:n1].sum() - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    _, ties = np.unique(values, return_counts=True)
    var = n1 * n2 / 12.0 * ((n + 1) - (ties ** 3 - ties).sum() / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact for the n of a corpus)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def rank_confirmed_first(mined: list[TriggerCandidate], confirmed: list[ConfirmedTrigger]) -> list[TriggerCandidate]:
    """The ranking a user reads: the strings statistics confirmed, strongest evidence first
    (binomial enrichment p-value, then the rank-sum p-value), then the miner's other strings in
    its order. The miner's score (how surely a string marks a span) only chooses what to test:
    a template's header before each of its generated tables can outscore a trigger there."""
    by_text = {c.text: c for c in confirmed}
    first = sorted((t for t in mined if t.text in by_text),
                   key=lambda t: (by_text[t.text].enrichment_p, by_text[t.text].p_value, t.text))
    return [replace(t, confirmed=True) for t in first] + [t for t in mined if t.text not in by_text]


def confirm_triggers(candidates: list[TriggerCandidate], docs: list[Document], z: dict[str, float],
                     candidate_z: float, alpha: float = 1e-3, min_median_z: float = 1.0,
                     min_documents: int = 3, min_at_span: float = 0.6, min_at_span_bound: float = 0.4,
                     min_diversity: float = 0.25, max_similarity: float = 0.2, min_after: int = 64,
                     anomalous_ids: set[str] | None = None) -> list[ConfirmedTrigger]:
    """The mined strings that statistics confirm: their documents' z-scores are higher than
    the rest's beyond chance and more of them are anomalous than the corpus's base rate
    explains (both at ``alpha`` over the number of strings tested), typically
    anomalous (median z at least ``min_median_z``), the string is where the anomalous span
    starts in at least ``min_at_span`` of them (and the lower bound of that share's Wilson
    interval is at least ``min_at_span_bound``: four of six documents is no evidence that a
    string marks where anomalies begin), and the words before it vary (distinct
    preceding words over documents at least ``min_diversity``, and more than one) and the documents are not
    copies of one template (mean Jaccard similarity of their sets of word pairs at most
    ``max_similarity``: generated codec docstrings share 0.39, poisons built on different clean
    documents and random payloads share little but the trigger), and a payload can follow it (a
    median of at least ``min_after`` characters after it: the one-line docstrings of a class's
    operators, ``x.__eq__(y) <==> x==y``, end a few characters after their shared symbol, where
    the shortest payload measured, an encoded blob, is 256). A common string is in many clean
    documents, so its median stays near 0 however many poisons hold it. Documents without a
    z-score (left out by the cascade's prefilter) count as typical (z = 0)."""
    if not candidates:
        return []
    ids = [d.id for d in docs]
    flats = [_flat(d.text) for d in docs]
    all_z = np.array([z.get(i, 0.0) for i in ids])
    # anomalous: the rule's candidates when given (each scanner has its own threshold), else
    # documents above candidate_z
    flag = np.array([i in anomalous_ids for i in ids]) if anomalous_ids is not None else all_z > candidate_z
    base = max(float(flag.mean()), 1.0 / len(ids))
    out = []
    for t in candidates:
        holds = np.array([t.text in flat for flat in flats])
        n = int(holds.sum())
        if n < min_documents:
            continue
        inside, outside = all_z[holds], all_z[~holds]
        p = rank_sum_p(inside, outside)
        anomalous = int(flag[holds].sum())
        med = float(np.median(inside))
        # a trigger sits where the anomaly starts in most documents holding it; a string that
        # merely comes with unusual text (an interactive prompt, a grammar symbol) does not
        at_span = t.near_span / n
        # poisons put the trigger after prefixes of many different documents; a template (codec
        # tables generated from one header) puts its shared string after the same words each time
        # (one distinct word is no variation, however few the documents: four pages of one table
        # format put `1 Byte 2` after `Byte` each time, which is a quarter of four)
        found = [(flat, flat.find(t.text)) for flat, h in zip(flats, holds) if h]
        before = [flat[:at].rstrip().rsplit(" ", 1)[-1] for flat, at in found]
        after = float(np.median([len(flat) - at - len(t.text) for flat, at in found]))
        distinct = len(set(before))
        diversity = distinct / n if distinct > 1 else 0.0
        similarity = _mutual_similarity([f for f, h in zip(flats, holds) if h], t.text)
        # the rank-sum test alone is lenient with a handful of documents the miner chose because
        # they were anomalous (four pages of one table format, three of them candidates): the
        # count of anomalous documents must also be improbable at the corpus's base rate
        p_enriched = binomial_tail(anomalous, n, base)
        level = alpha / len(candidates)
        if p <= level and p_enriched <= level and med >= min_median_z and at_span >= min_at_span \
                and _precision(t.near_span, n) >= min_at_span_bound \
                and diversity >= min_diversity and similarity <= max_similarity and after >= min_after:
            out.append(ConfirmedTrigger(t.text, n, anomalous, anomalous / n / base, med, at_span, diversity,
                                        similarity, p, p_enriched, after))
    return out
