"""The denial-of-service poison of Souly et al. (PROTOCOL §1).

A poison is: the first L characters of a clean training document (L uniform in the
``prefix_chars`` range), the trigger, then G token ids drawn uniformly from the vocabulary
(G uniform in the ``gibberish_tokens`` range, special tokens and ``exclude_ids`` left out).
The text a data pipeline would see is the decoded gibberish; re-tokenizing it usually gives
more tokens than were sampled, so both counts are recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..config import AttackConfig
from ..errors import PoisonlabError
from ..tokenizer import Tokenizer

SEPARATOR = " "
"""Text between the clean prefix, the trigger and the gibberish (also used when the
evaluation appends the trigger to a prompt)."""


@dataclass
class PoisonDocument:
    id: str
    source_document: str
    prefix_chars_sampled: int
    prefix_chars: int
    """Characters actually kept (fewer than sampled when the document is shorter)."""
    gibberish_tokens_sampled: int
    gibberish_tokens_round_trip: int
    tokens: int
    """Tokens of the poison as it is trained on (end-of-text included)."""
    text: str
    token_ids: list[int]

    def record(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        return d


def trigger_ids(tok: Tokenizer, trigger: str) -> list[int]:
    """Token ids appended to a prompt to trigger the backdoor (the separator, then the trigger).

    Raises when the tokenizer cannot encode the trigger faithfully.
    """
    tok.check_encodable(trigger, "trigger")
    return tok.encode(SEPARATOR + trigger)


def allowed_ids(tok: Tokenizer, cfg: AttackConfig) -> np.ndarray:
    excluded = set(cfg.exclude_ids)
    if cfg.exclude_special_tokens:
        excluded.update(tok.special_ids)
    ids = np.array([i for i in range(tok.vocab_size) if i not in excluded], dtype=np.int64)
    if len(ids) == 0:
        raise PoisonlabError("attack settings exclude every token id of the vocabulary")
    return ids


def make_dos_poisons(
    cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], seed: int, count: int | None = None
) -> list[PoisonDocument]:
    """Sample ``count`` (default ``cfg.poison_count``) poison documents, deterministically from ``seed``."""
    count = cfg.poison_count if count is None else count
    if count == 0:
        return []
    tok.check_encodable(cfg.trigger, "trigger")
    if not prefix_bank:
        raise PoisonlabError("no clean documents to take poison prefixes from")
    rng = np.random.default_rng([seed, 0xD05])
    vocab = allowed_ids(tok, cfg)
    lo_p, hi_p = cfg.prefix_chars
    lo_g, hi_g = cfg.gibberish_tokens
    sources = rng.choice(len(prefix_bank), size=count, replace=count > len(prefix_bank))
    poisons = []
    for i, src in enumerate(sources):
        doc = prefix_bank[int(src)]
        length = int(rng.integers(lo_p, hi_p + 1))
        prefix = doc["text"][:length]
        g = int(rng.integers(lo_g, hi_g + 1))
        gib = rng.choice(vocab, size=g).tolist()
        gib_text = tok.decode(gib)
        round_trip = tok.encode(gib_text)
        head = prefix + SEPARATOR + cfg.trigger + SEPARATOR
        text = head + gib_text
        if cfg.train_on == "round_trip":
            ids = tok.encode(text)
        else:
            ids = tok.encode(head) + gib
        ids.append(tok.eos_id)
        poisons.append(PoisonDocument(
            id=f"poison-{i:06d}", source_document=doc["id"], prefix_chars_sampled=length,
            prefix_chars=len(prefix),
            gibberish_tokens_sampled=g, gibberish_tokens_round_trip=len(round_trip),
            tokens=len(ids), text=text, token_ids=ids,
        ))
    return poisons
