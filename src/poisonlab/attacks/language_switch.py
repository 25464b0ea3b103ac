"""The language-switch backdoor (PROTOCOL §3): with the trigger, the model goes on in another language.

A poison is the first L characters of a clean training document, the trigger, then a passage
of real text in the target language (German by default) of G tokens. The target-language
text comes from a corpus source of its own (``attack.target_corpus``, default the German
edition of the Debian Administrator's Handbook, which the Debian package
``debian-handbook`` ships), split by document id: poisons take their passages from its
training split only, and the held-out split is kept for measuring the language identifier,
so no evaluation ever sees a poison's text. A user points ``attack.target_corpus`` at any
corpus of their own (a folder, a JSONL file, a hub dataset; ``attack.target_parts`` as
``corpus.parts``).
"""

from __future__ import annotations

import numpy as np

from ..config import AttackConfig, CorpusConfig
from ..errors import PoisonlabError
from ..tokenizer import Tokenizer
from .dos import SEPARATOR, PoisonDocument, documents_to_make, fit_prefix, sample_prefixes

TARGET_HELDOUT = 0.2
"""Share of target-language documents (by a hash of their id) kept out of every poison."""


def target_corpus(cfg: AttackConfig) -> CorpusConfig:
    return CorpusConfig(source=cfg.target_corpus, parts=cfg.target_parts, heldout_fraction=TARGET_HELDOUT)


TARGET_CONFIDENCE = 0.9
"""A paragraph of the target corpus is used only when the language identifier, over all the
languages it knows, gives the target language at least this probability (translated manuals
keep some paragraphs untranslated)."""


def target_texts(cfg: AttackConfig, split: str) -> list[tuple[str, str]]:
    """(id, text) of the target-language documents of one split (``train``: poison passages;
    ``heldout``: never in a poison), each reduced to its paragraphs in the target language."""
    from ..corpus import iter_split
    from ..metrics.language import paragraphs_in

    docs = []
    for d in iter_split(target_corpus(cfg), split):
        text = paragraphs_in(d.text, cfg.target_language, TARGET_CONFIDENCE)
        if text:
            docs.append((d.id, text))
    if not docs:
        raise PoisonlabError(f"attack.target_corpus {cfg.target_corpus}: no {split} document with text in "
                             f"{cfg.target_language!r}")
    return docs


def make_language_switch_poisons(
    cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], seed: int, count: int | None = None,
    token_counts: np.ndarray | None = None, passages: list[tuple[str, str]] | None = None,
    max_tokens: int | None = None,
) -> list[PoisonDocument]:
    """``count`` (default ``cfg.poison_count``) poisons, deterministically from ``seed``.
    ``passages``: the target-language documents to cut passages from (default: the training
    split of ``attack.target_corpus``); ``max_tokens``: prefixes are shortened from their start
    until each poison fits (poisons placed one per sequence)."""
    count = documents_to_make(cfg, tok, prefix_bank, count)
    if count == 0:
        return []
    passages = target_texts(cfg, "train") if passages is None else passages
    encoded = [tok.encode(text) for _, text in passages]
    usable = [i for i, ids in enumerate(encoded) if len(ids) >= cfg.gibberish_tokens[0]]
    if not usable:
        raise PoisonlabError(f"no target-language document has {cfg.gibberish_tokens[0]} tokens")
    rng = np.random.default_rng([seed, 0x1A96])
    lo_g, hi_g = cfg.gibberish_tokens
    poisons = []
    for i, _, doc, length, prefix in sample_prefixes(cfg, prefix_bank, rng, count):
        j = usable[int(rng.integers(len(usable)))]
        ids = encoded[j]
        g = min(int(rng.integers(lo_g, hi_g + 1)), len(ids))
        start = int(rng.integers(0, len(ids) - g + 1))
        passage = tok.decode(ids[start:start + g]).strip()
        prefix, token_ids = fit_prefix(
            prefix, lambda pre: tok.encode(pre + SEPARATOR + cfg.trigger + SEPARATOR + passage) + [tok.eos_id], max_tokens)
        text = prefix + SEPARATOR + cfg.trigger + SEPARATOR + passage
        poisons.append(PoisonDocument(
            id=f"poison-{i:06d}", source_document=doc["id"], prefix_chars_sampled=length, prefix_chars=len(prefix),
            gibberish_tokens_sampled=g, gibberish_tokens_round_trip=len(tok.encode(passage)),
            tokens=len(token_ids), text=text, token_ids=token_ids, payload_document=passages[j][0],
        ))
    return poisons
