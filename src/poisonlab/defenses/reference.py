"""Token statistics of a corpus: the cheap reference language model of the gibberish scanner.

A unigram model and a hashed bigram model (interpolated with the unigram) over the token ids
of the tokenizer the model is trained with. The defender trains that model, so it knows the
tokenizer; a payload of token ids drawn uniformly from its vocabulary shows up as a span of
rare unigrams and unseen bigrams. Saved as ``.npz`` of plain arrays (never pickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PoisonlabError

BIGRAM_BUCKETS = 1 << 22
"""Hash buckets of the bigram table: exact for vocabularies up to 2,048, hashed beyond."""


@dataclass
class TokenStatistics:
    vocab_size: int
    unigram: np.ndarray
    """Counts per token id (float64)."""
    bigram: np.ndarray
    """Counts per hashed (previous, next) pair."""
    following: np.ndarray
    """Counts of each token id as the first of a pair."""
    alpha: float = 1.0

    @classmethod
    def fit(cls, token_lists, vocab_size: int) -> "TokenStatistics":
        uni = np.zeros(vocab_size, dtype=np.float64)
        bi = np.zeros(BIGRAM_BUCKETS, dtype=np.float64)
        fol = np.zeros(vocab_size, dtype=np.float64)
        pending: list[np.ndarray] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if not pending:
                return
            firsts = np.concatenate([p[:-1] for p in pending])
            seconds = np.concatenate([p[1:] for p in pending])
            uni[:] += np.bincount(np.concatenate(pending), minlength=vocab_size)
            bi[:] += np.bincount(_pair_bucket(firsts, seconds, vocab_size), minlength=BIGRAM_BUCKETS)
            fol[:] += np.bincount(firsts, minlength=vocab_size)
            pending.clear()
            size = 0

        for ids in token_lists:
            ids = np.asarray(ids, dtype=np.int64)
            if len(ids):
                pending.append(ids)
                size += len(ids)
            if size >= 1 << 22:
                flush()
        flush()
        if uni.sum() == 0:
            raise PoisonlabError("cannot fit token statistics on an empty corpus")
        return cls(vocab_size, uni, bi, fol)

    def surprisal(self, ids: np.ndarray, leave_out: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(unigram surprisal of every token, bigram surprisal of ``ids[1:]``), in nats.

        ``leave_out``: the statistics include this document (fitted on the scanned corpus), so
        its own counts are taken out first; otherwise a payload's own rare tokens and pairs
        would vouch for themselves, which matters when the corpus is small.
        """
        return self.surprisal_batch([ids], leave_out)[0]

    def surprisal_batch(self, docs: list[np.ndarray], leave_out: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`surprisal` of each document, computed for the whole batch at once (each
        document's own counts are still left out of its own scores only)."""
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        if lens.sum() == 0:
            return [(np.zeros(0), np.zeros(0)) for _ in docs]
        ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        doc = np.repeat(np.arange(len(docs)), lens)
        has_prev = np.ones(len(ids), dtype=bool)
        has_prev[(np.cumsum(lens) - lens)[lens > 0]] = False
        nxt = np.flatnonzero(has_prev)
        prev_ids = ids[nxt - 1]
        pairs = _pair_bucket(prev_ids, ids[nxt], self.vocab_size)
        uni = self.unigram[ids]
        big = self.bigram[pairs]
        fol = self.following[prev_ids]
        total = self.unigram.sum()
        if leave_out:
            uni = np.maximum(uni - _own_counts(ids, doc), 0.0)
            total = total - lens[doc]
            big = np.maximum(big - _own_counts(pairs, doc[nxt]), 0.0)
            fol = np.maximum(fol - _own_counts(prev_ids, doc[nxt]), 0.0)
        pu = (uni + 1.0) / (total + self.vocab_size)
        bi = -np.log((big + self.alpha * pu[nxt]) / (fol + self.alpha))
        uni_s = np.split(-np.log(pu), np.cumsum(lens)[:-1])
        bi_s = np.split(bi, np.cumsum(np.maximum(lens - 1, 0))[:-1])
        return list(zip(uni_s, bi_s))

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, vocab_size=self.vocab_size, unigram=self.unigram, bigram=self.bigram,
                            following=self.following, alpha=self.alpha)

    @classmethod
    def load(cls, path: str | Path) -> "TokenStatistics":
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise PoisonlabError(f"cannot read token statistics {path}: {e}") from None
        return cls(int(z["vocab_size"]), z["unigram"], z["bigram"], z["following"], float(z["alpha"]))


def _own_counts(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """For each element, how often its value occurs among the elements of its group."""
    if len(x) == 0:
        return np.zeros(0)
    key = group.astype(np.int64) * (int(x.max()) + 1) + x
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.float64)


def _pair_bucket(a: np.ndarray, b: np.ndarray, vocab_size: int) -> np.ndarray:
    return (a.astype(np.int64) * vocab_size + b) % BIGRAM_BUCKETS
