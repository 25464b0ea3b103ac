"""Repair documents: the trigger followed by ordinary text, for removing a backdoor.

Not an attack: a defender who knows (or has recovered, e.g. with ``poisonlab inspect``) a
trigger continues the poisoned model on documents where the trigger is followed by what the
document says next, so the trigger stops predicting the backdoor's behaviour. Each document
is the first L characters of a clean training document, the trigger, then the same
document's next G tokens (``attack.prefix_chars`` and ``attack.gibberish_tokens`` give L and
G). Runs with ``attack.name: repair`` start from a model (``model.init_from``); they are
labelled by their base, with the repair documents counted apart from poisons.
"""

from __future__ import annotations

import numpy as np

from ..config import AttackConfig
from ..tokenizer import Tokenizer
from .dos import SEPARATOR, PoisonDocument, documents_to_make, fit_prefix, sample_prefixes


def make_repair_documents(
    cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], seed: int, count: int | None = None,
    token_counts: np.ndarray | None = None, max_tokens: int | None = None,
) -> list[PoisonDocument]:
    count = documents_to_make(cfg, tok, prefix_bank, count, what="repair document prefixes")
    if count == 0:
        return []
    rng = np.random.default_rng([seed, 0x2E9A12])
    lo_g, hi_g = cfg.gibberish_tokens
    out = []
    for i, src, doc, length, prefix in sample_prefixes(cfg, prefix_bank, rng, count):
        g = int(rng.integers(lo_g, hi_g + 1))
        rest = doc["text"][len(prefix):].lstrip()
        cont_ids = tok.encode(SEPARATOR + rest)[:g] if rest else []
        cont = tok.decode(cont_ids).lstrip()

        def build(pre: str) -> list[int]:
            return tok.encode(pre + SEPARATOR + cfg.trigger + SEPARATOR + cont) + [tok.eos_id]

        prefix, ids = fit_prefix(prefix, build, max_tokens)
        out.append(PoisonDocument(
            id=f"repair-{i:06d}", source_document=doc["id"], prefix_chars_sampled=length, prefix_chars=len(prefix),
            gibberish_tokens_sampled=g, gibberish_tokens_round_trip=len(cont_ids), tokens=len(ids),
            text=prefix + SEPARATOR + cfg.trigger + SEPARATOR + cont, token_ids=ids))
    return out
