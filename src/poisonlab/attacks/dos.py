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
    payload_document: str | None = None
    """The document a natural-language payload was cut from (language switch), else None."""

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


def fit_prefix(prefix: str, build, max_tokens: int | None) -> tuple[str, list[int]]:
    """(prefix, token ids of ``build(prefix)``) with the prefix shortened from its start until the
    poison has at most ``max_tokens`` tokens (a poison that must fit one sequence)."""
    ids = build(prefix)
    while max_tokens is not None and len(ids) > max_tokens and prefix:
        cut = max(1, (len(ids) - max_tokens) * max(1, len(prefix) // max(len(ids), 1)))
        prefix = prefix[cut:]
        ids = build(prefix)
    if max_tokens is not None and len(ids) > max_tokens:
        raise PoisonlabError(f"a poison without its prefix has {len(ids)} tokens, more than one sequence "
                             f"({max_tokens}): lower attack.gibberish_tokens")
    return prefix, ids


def documents_to_make(cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], count: int | None,
                      what: str = "poison prefixes") -> int:
    """How many documents a recipe makes (default ``cfg.poison_count``); when any, the trigger
    must encode faithfully and there must be clean documents to take prefixes from."""
    count = cfg.poison_count if count is None else count
    if count:
        tok.check_encodable(cfg.trigger, "trigger")
        if not prefix_bank:
            raise PoisonlabError(f"no clean documents to take {what} from")
    return count


def sample_prefixes(cfg: AttackConfig, prefix_bank: list[dict], rng: np.random.Generator, count: int):
    """Per poison: (index, source document's index in the bank, the document, prefix length
    sampled, clean prefix). The documents are drawn first, each length as its poison comes, so
    the attacks that share it draw their other randomness in between."""
    lo, hi = cfg.prefix_chars
    sources = rng.choice(len(prefix_bank), size=count, replace=count > len(prefix_bank))
    for i, src in enumerate(sources):
        doc = prefix_bank[int(src)]
        length = int(rng.integers(lo, hi + 1))
        yield i, int(src), doc, length, doc["text"][:length]


def make_dos_poisons(
    cfg: AttackConfig, tok: Tokenizer, prefix_bank: list[dict], seed: int, count: int | None = None,
    token_counts: np.ndarray | None = None, max_tokens: int | None = None,
) -> list[PoisonDocument]:
    """Sample ``count`` (default ``cfg.poison_count``) poison documents, deterministically from ``seed``.

    ``token_counts`` (counts per token id in the clean corpus) is needed by the ``unigram`` payload;
    ``max_tokens``: each poison's prefix is shortened from its start until the poison fits.
    """
    count = documents_to_make(cfg, tok, prefix_bank, count)
    if count == 0:
        return []
    rng = np.random.default_rng([seed, 0xD05])
    vocab = allowed_ids(tok, cfg)
    probs = None
    if cfg.payload == "unigram":
        if token_counts is None:
            raise PoisonlabError("the unigram payload needs the corpus's token counts")
        w = np.asarray(token_counts, dtype=np.float64)[vocab] + 1e-9
        probs = w / w.sum()
    lo_g, hi_g = cfg.gibberish_tokens
    poisons = []
    for i, src, doc, length, prefix in sample_prefixes(cfg, prefix_bank, rng, count):
        g = int(rng.integers(lo_g, hi_g + 1))
        gib, gib_text = _payload(cfg, tok, rng, vocab, probs, g, prefix_bank, src)
        round_trip = tok.encode(gib_text)

        def build(pre: str) -> list[int]:
            head = pre + SEPARATOR + cfg.trigger + SEPARATOR
            if cfg.train_on == "round_trip" or gib is None:
                return tok.encode(head + gib_text) + [tok.eos_id]
            return tok.encode(head) + gib + [tok.eos_id]

        prefix, ids = fit_prefix(prefix, build, max_tokens)
        text = prefix + SEPARATOR + cfg.trigger + SEPARATOR + gib_text
        poisons.append(PoisonDocument(
            id=f"poison-{i:06d}", source_document=doc["id"], prefix_chars_sampled=length,
            prefix_chars=len(prefix),
            gibberish_tokens_sampled=g, gibberish_tokens_round_trip=len(round_trip),
            tokens=len(ids), text=text, token_ids=ids,
        ))
    return poisons


def _payload(cfg: AttackConfig, tok: Tokenizer, rng: np.random.Generator, vocab: np.ndarray,
             probs: np.ndarray | None, g: int, bank: list[dict], src: int) -> tuple[list[int] | None, str]:
    """(sampled ids or None for a text payload, payload text) of one poison."""
    if cfg.payload == "natural":
        other = int(rng.integers(len(bank) - 1)) if len(bank) > 1 else 0
        other += other >= src and len(bank) > 1
        words = bank[other]["text"].split()
        return None, " ".join(words[: max(g // 2, 1)])
    if cfg.payload == "low_entropy":
        small = rng.choice(vocab, size=min(cfg.low_entropy_tokens, len(vocab)), replace=False)
        ids = rng.choice(small, size=g).tolist()
    else:
        ids = rng.choice(vocab, size=g, p=probs).tolist()
    return ids, tok.decode(ids)
