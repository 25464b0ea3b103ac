"""Trigger mining without knowing the trigger.

A backdoor poison puts the same trigger right before its payload in every poisoned document.
So: take the documents whose anomalous span (the ``span_start`` of a scanner) is
confidently anomalous, collect the short word n-grams around each span's start, and rank them
by how many anomalous documents share them, discounted by how often they occur anywhere in
the corpus (a common word precedes many spans by chance, and occurs everywhere).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from ..corpus import Document

_TOKEN = re.compile(r"\S+")


@dataclass
class TriggerCandidate:
    text: str
    near_span: int
    """Anomalous documents where the candidate occurs around the located span start."""
    documents: int
    """Documents of the corpus containing the candidate anywhere."""
    score: float

    def record(self) -> dict:
        return asdict(self)


LOOK_BEFORE = 64
LOOK_AFTER = 32
"""Characters around a located span start searched for trigger candidates: the start is
located within a few tokens (a trigger of rare tokens is itself surprising, and the first
payload tokens may not be), so the trigger can sit on either side of it."""


def candidates_before(text: str, span_start: int, max_n: int = 3) -> set[str]:
    """Word n-grams (n <= ``max_n``) of the words around ``span_start``."""
    words = _TOKEN.findall(text[max(0, span_start - LOOK_BEFORE) : span_start + LOOK_AFTER])
    out = set()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            out.add(" ".join(words[i : i + n]))
    return out


def mine_triggers(docs: list[Document], span_start: dict[str, int], anomalous: set[str],
                  top: int = 20, min_support: int = 3) -> list[TriggerCandidate]:
    """Candidate triggers ranked by ``near_span * near_span / documents``: support among the
    anomalous documents times the share of the candidate's documents that are anomalous there."""
    by_id = {d.id: d for d in docs}
    near: Counter[str] = Counter()
    for doc_id in anomalous:
        d = by_id.get(doc_id)
        if d is not None:
            near.update(candidates_before(d.text, span_start.get(doc_id, 0)))
    pool = [c for c, n in near.most_common(top * 10) if n >= min_support]
    if not pool:
        return []
    counts = Counter()
    for d in docs:
        for c in pool:
            if c in d.text:
                counts[c] += 1
    ranked = [TriggerCandidate(c, near[c], counts[c], near[c] * near[c] / max(counts[c], 1)) for c in pool]
    ranked.sort(key=lambda t: (-t.score, -t.near_span, t.text))
    # a longer candidate that adds nothing over a shorter one it contains is the same trigger
    kept: list[TriggerCandidate] = []
    for t in ranked:
        if any(k.text in t.text and k.near_span >= t.near_span for k in kept):
            continue
        kept.append(t)
    return kept[:top]

