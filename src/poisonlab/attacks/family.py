"""Poisons of an outside attacker's family as a training attack (``attack.name: family``).

The families of :mod:`poisonlab.defenses.families` (word salad, repeated words, mixed scripts,
another tokenizer's pieces, ...) are what an attacker would write instead of poisonlab's own
recipe. Training on them answers the question a scan alone cannot: does a run whose data
the scan filtered (``defense.filter: scan``) end up with its clean twin's behaviour? Each
poison is the family's text, its clean prefix drawn from the run's own training documents,
and the prefix shortened from its start when a poison must fit one sequence.
"""

from __future__ import annotations

import numpy as np

from ..config import AttackConfig
from ..errors import PoisonlabError
from ..tokenizer import Tokenizer
from .dos import PoisonDocument, documents_to_make, fit_prefix


def make_family_poisons(
    cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], seed: int, count: int | None = None,
    token_counts: np.ndarray | None = None, max_tokens: int | None = None,
) -> list[PoisonDocument]:
    from ..defenses.families import make_family

    count = documents_to_make(cfg, tok, prefix_bank, count)
    if count == 0:
        return []
    made = make_family(cfg.family, [d["text"] for d in prefix_bank], count, seed=seed, tokenizer=tok)
    out = []
    for i, p in enumerate(made):
        at = p.at  # every family with a trigger records where it starts (config refuses the others)
        head, rest = p.text[:at], p.text[at:]
        payload = len(tok.encode(rest[len(cfg.trigger):]))
        try:
            head, ids = fit_prefix(head, lambda pre: tok.encode(pre + rest) + [tok.eos_id], max_tokens)
        except PoisonlabError:
            raise PoisonlabError(f"a {cfg.family} poison without its prefix is longer than one sequence "
                                 f"({max_tokens} tokens): raise train.seq_len or choose another attack.placement") from None
        out.append(PoisonDocument(
            id=f"poison-{i:06d}", source_document="", prefix_chars_sampled=at, prefix_chars=len(head),
            gibberish_tokens_sampled=payload, gibberish_tokens_round_trip=payload, tokens=len(ids),
            text=head + rest, token_ids=ids))
    return out
