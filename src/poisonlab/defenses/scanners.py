"""Document scanners: each scores every document and returns rows keyed by document id.

A scanner has a ``name``, an optional corpus-level ``fit(docs)`` pass (statistics that need
the whole corpus: reference counts, MinHash buckets) and ``score(docs) -> list[dict]``. Rows
hold ``id`` and ``<scanner>.<field>`` values; :func:`poisonlab.defenses.pipeline.scan` merges
them into one table that is written beside the corpus, never into it.

Higher scores are more suspicious for every field a filter thresholds.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..corpus import Document
from ..tokenizer import Tokenizer
from .reference import TokenStatistics


def window_max(values: np.ndarray, window: int) -> tuple[float, int]:
    """(largest mean over ``window`` consecutive values, its start); the plain mean when shorter."""
    if len(values) == 0:
        return 0.0, 0
    if len(values) <= window:
        return float(values.mean()), 0
    c = np.concatenate([[0.0], np.cumsum(values)])
    means = (c[window:] - c[:-window]) / window
    i = int(np.argmax(means))
    return float(means[i]), i


def step_up(values: np.ndarray) -> int:
    """Index where an anomalous span starts: the split ``t`` that maximises the CUSUM statistic
    ``sqrt(t (n - t) / n) * (mean(values[t:]) - mean(values[:t]))``, the most likely single
    step up in the mean."""
    n = len(values)
    if n < 2:
        return 0
    c = np.cumsum(values)
    t = np.arange(1, n)
    before = c[:-1] / t
    after = (c[-1] - c[:-1]) / (n - t)
    stat = np.sqrt(t * (n - t) / n) * (after - before)
    return int(t[np.argmax(stat)])


def local_step(values: np.ndarray, at: int, window: int, lookback: int = 4) -> int:
    """Where the span of ``window`` values starting at ``at`` (the most anomalous window) began:
    the step up within the ``lookback`` windows before it. A payload inside a long document is
    a bump, not a step to the end, and the document's single most likely step can lie far from
    it; searched near the anomalous window, the step is the bump's start."""
    lo = max(0, at - lookback * window)
    return lo + step_up(values[lo : at + window])


class GibberishScanner:
    """Per-span surprisal of a document's tokens under corpus token statistics.

    Fields: ``bigram_surprisal`` and ``unigram_surprisal`` (nats/token, the largest mean over
    ``window`` tokens), ``token_entropy`` (bits, entropy of the token distribution in the most
    surprising window: text repeats tokens, uniform gibberish does not), ``span_start``
    (the character where the surprisal steps up most: where a payload running to the end
    would begin) and ``local_start`` (the step up just before the most surprising window: where
    a payload inside the document would begin).
    """

    name = "gibberish"

    def __init__(self, tokenizer: Tokenizer, stats: TokenStatistics | None = None, window: int = 64,
                 leave_out: bool = True, cache_tokens: int = 50_000_000):
        """``stats``: statistics fitted beforehand (by default :meth:`fit` fits them on the scanned
        corpus). ``leave_out``: the statistics include the scanned documents, so each is scored
        with its own counts taken out; set False for statistics of a separate reference corpus.
        ``cache_tokens``: up to this many tokens encoded while fitting are kept for scoring, so
        a corpus of that size is tokenized once (tokenizing is most of the scanner's cost)."""
        self.tokenizer = tokenizer
        self.stats = stats
        self.window = window
        self.leave_out = leave_out
        self.cache_tokens = cache_tokens
        self._cache: dict[str, tuple] = {}

    def _encode(self, docs: list[Document]):
        out: list = [None] * len(docs)
        todo = []
        for i, d in enumerate(docs):
            hit = self._cache.pop(d.id, None)
            if hit is not None and hit[2] == len(d.text):
                out[i] = hit[:2]
            else:
                todo.append(i)
        fast = self.tokenizer.plain
        if fast is not None:
            encs = fast.encode_batch([docs[i].text for i in todo], add_special_tokens=False)
            for i, e in zip(todo, encs):
                out[i] = (np.asarray(e.ids, dtype=np.int64), e.offsets)
        else:
            for i in todo:
                out[i] = (np.asarray(self.tokenizer.encode(docs[i].text), dtype=np.int64), None)
        return out

    def fit(self, docs: list[Document], batch: int = 512) -> None:
        if self.stats is not None:
            return
        budget = [self.cache_tokens]

        def lists():
            for i in range(0, len(docs), batch):
                part = docs[i : i + batch]
                for d, (ids, offsets) in zip(part, self._encode(part)):
                    if budget[0] >= len(ids):
                        budget[0] -= len(ids)
                        self._cache[d.id] = (ids, offsets, len(d.text))
                    yield ids

        self.stats = TokenStatistics.fit(lists(), self.tokenizer.vocab_size)

    def score(self, docs: list[Document]) -> list[dict]:
        assert self.stats is not None, "fit the scanner (or give it statistics) first"
        rows = []
        w = self.window
        encoded = self._encode(docs)
        scores = self.stats.surprisal_batch([ids for ids, _ in encoded], leave_out=self.leave_out)
        for doc, (ids, offsets), (uni, bi) in zip(docs, encoded, scores):
            if len(ids) < 2:
                rows.append({"id": doc.id, "gibberish.bigram_surprisal": 0.0, "gibberish.unigram_surprisal": 0.0,
                             "gibberish.token_entropy": 0.0, "gibberish.span_start": 0, "gibberish.local_start": 0})
                continue
            b_max, at = window_max(bi, w)
            u_max, _ = window_max(uni, w)
            starts = []
            for tok_at in (step_up(bi) + 1, local_step(bi, at, w) + 1):
                starts.append(int(offsets[tok_at][0]) if offsets is not None and tok_at < len(offsets) else 0)
            rows.append({"id": doc.id, "gibberish.bigram_surprisal": b_max, "gibberish.unigram_surprisal": u_max,
                         "gibberish.token_entropy": _entropy_bits(ids[at + 1 : at + 1 + w]),
                         "gibberish.span_start": starts[0], "gibberish.local_start": starts[1]})
        return rows


def _entropy_bits(ids: np.ndarray) -> float:
    _, counts = np.unique(ids, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _word_offset(text: str, words: list[str], index: int) -> int:
    """Character offset of ``words[index]`` in ``text`` (the words of ``text.split()``)."""
    pos = 0
    for i in range(min(index, len(words) - 1) + 1):
        start = text.find(words[i], pos)
        if i == index or start < 0:
            return max(start, 0)
        pos = start + len(words[i])
    return 0


class NoveltyScanner:
    """Share of words (whitespace-separated strings) that occur in no other document of the
    corpus, the largest over ``window`` consecutive words: decoded random tokens make strings
    nobody else writes. Needs no tokenizer; one corpus pass counts document frequencies.

    Fields: ``rate`` (0 to 1), ``span_start`` (character offset where novel words begin: the
    most likely step up in the share of novel words) and ``local_start`` (the step up just
    before the most novel window). The detection rule's cascade sends only documents at or above ``defense.prefilter``
    on to the token-level :class:`GibberishScanner`, and its z-score makes candidates too.
    """

    name = "novelty"

    def __init__(self, window: int = 32):
        self.window = window
        self.document_frequency: Counter[str] = Counter()

    def fit(self, docs: list[Document]) -> None:
        df = Counter()
        for d in docs:
            df.update(set(d.text.split()))
        self.document_frequency = df

    def save(self, path: str | Path) -> None:
        """The document frequencies as one ``.npz`` (the words as JSON bytes: no pickle)."""
        words = list(self.document_frequency)
        np.savez(path, words=_json_bytes(words), counts=np.array([self.document_frequency[w] for w in words], np.int64),
                 window=np.int64(self.window))

    @classmethod
    def load(cls, path: str | Path) -> "NoveltyScanner":
        with np.load(path, allow_pickle=False) as z:
            out = cls(int(z["window"]))
            out.document_frequency = Counter(dict(zip(_from_json_bytes(z["words"]), z["counts"].tolist())))
        return out

    def score(self, docs: list[Document]) -> list[dict]:
        get = self.document_frequency.get
        rows = []
        for d in docs:
            words = d.text.split()
            # seen once in the corpus = only here (a document scored without being fitted: never)
            novel = np.array([get(w, 0) for w in words]) <= 1 if words else np.zeros(0, bool)
            x = novel.astype(np.float64)
            rate, top = window_max(x, self.window)
            at = step_up(x)  # where novel text begins, not its most novel window
            rows.append({"id": d.id, "novelty.rate": rate, "novelty.span_start": _word_offset(d.text, words, at),
                         "novelty.local_start": _word_offset(d.text, words, local_step(x, top, self.window))})
        return rows


def _json_bytes(words: list[str]) -> np.ndarray:
    # ASCII JSON escapes every character, lone surrogates included, and loads without pickle
    return np.frombuffer(json.dumps(words, ensure_ascii=True).encode("ascii"), np.uint8)


def _from_json_bytes(a: np.ndarray) -> list[str]:
    return json.loads(a.tobytes().decode("ascii"))


_LETTERS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
"""A word of the word-order scanner: a run of letters (any script), case folded."""


class WordOrderScanner:
    """Whether a document's words follow one another as words of this corpus do, and whether
    one word or short phrase repeats. Needs no tokenizer, so it does not depend on the
    payload's vocabulary: real words in random order (word salad) or one word repeated are
    ordinary tokens to every tokenizer.

    One corpus pass counts words and adjacent word pairs. A pair's association is
    ``log((n_ab + 1) / (n_a n_b / N + 1))`` with the document's own counts left out, so a
    payload's pairs do not vouch for themselves: about 0 for words drawn independently of one
    another (and below 0 for frequent words that never meet), clearly above 0 in prose,
    whose neighbouring words go together.

    Fields: ``disorder`` (minus the lowest mean association over ``window`` consecutive word
    pairs: at or above 0, the words of that span are no more associated than words drawn at
    random), ``disorder_start`` (character where the association steps down most: where such
    a span begins), ``repetition`` (the largest share of ``window`` consecutive words that
    repeat one of the three words before them: one word or a phrase of up to three, over and
    over), ``repetition_start`` and ``words``. Documents with fewer than ``min_words`` words
    get 0 for both scores (too few pairs to tell).
    """

    name = "order"
    min_words = 32

    def __init__(self, window: int = 64, lags: int = 3):
        self.window, self.lags = window, lags
        self.vocab: dict[str, int] = {}
        self.unigram = np.zeros(0, np.int64)
        self.pair_keys = np.zeros(0, np.int64)
        self.pair_counts = np.zeros(0, np.int64)
        self.total = 0

    def _words(self, text: str, grow: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(word ids, character offsets); words not seen by ``fit`` get -1."""
        ids, starts = [], []
        vocab = self.vocab
        for m in _LETTERS.finditer(text):
            w = m.group().casefold()
            i = vocab.get(w)
            if i is None and grow:
                i = vocab[w] = len(vocab)
            ids.append(-1 if i is None else i)
            starts.append(m.start())
        return np.array(ids, np.int64), np.array(starts, np.int64)

    @staticmethod
    def _keys(ids: np.ndarray) -> np.ndarray:
        return (ids[:-1] << 32) | ids[1:]

    def fit(self, docs: list[Document]) -> None:
        self.vocab = {}
        per_doc = [self._words(d.text, grow=True)[0] for d in docs]
        self.unigram = np.bincount(np.concatenate(per_doc + [np.zeros(0, np.int64)]), minlength=len(self.vocab))
        self.total = int(self.unigram.sum())
        keys = np.concatenate([self._keys(i) for i in per_doc if len(i) > 1] + [np.zeros(0, np.int64)])
        self.pair_keys, self.pair_counts = np.unique(keys, return_counts=True)

    def _pair_counts(self, keys: np.ndarray) -> np.ndarray:
        if len(self.pair_keys) == 0:
            return np.zeros(len(keys), np.int64)
        at = np.minimum(np.searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
        return np.where(self.pair_keys[at] == keys, self.pair_counts[at], 0)

    def save(self, path: str | Path) -> None:
        """The fitted counts as one ``.npz`` (the vocabulary as JSON bytes: no pickle)."""
        words = sorted(self.vocab, key=self.vocab.get)
        np.savez(path, words=_json_bytes(words), unigram=self.unigram, pair_keys=self.pair_keys,
                 pair_counts=self.pair_counts, total=np.int64(self.total),
                 window=np.int64(self.window), lags=np.int64(self.lags))

    @classmethod
    def load(cls, path: str | Path) -> "WordOrderScanner":
        with np.load(path, allow_pickle=False) as z:
            out = cls(int(z["window"]), int(z["lags"]))
            out.vocab = {w: i for i, w in enumerate(_from_json_bytes(z["words"]))}
            out.unigram, out.pair_keys, out.pair_counts = z["unigram"], z["pair_keys"], z["pair_counts"]
            out.total = int(z["total"])
        return out

    def association(self, ids: np.ndarray) -> np.ndarray:
        """Each adjacent pair's association, the document's own counts left out."""
        known = ids >= 0
        safe = np.where(known, ids, 0)
        uni = np.where(known, self.unigram[safe] if len(self.unigram) else 0, 0)
        # the document's own occurrences are not evidence about the corpus
        _, inv, own = np.unique(ids, return_inverse=True, return_counts=True)
        uni = np.maximum(uni - np.where(known, own[inv], 0), 0)
        keys = self._keys(safe)
        pair_known = known[:-1] & known[1:]
        _, pinv, pown = np.unique(keys, return_inverse=True, return_counts=True)
        n_ab = np.where(pair_known, np.maximum(self._pair_counts(keys) - pown[pinv], 0), 0)
        expected = uni[:-1] * uni[1:] / max(self.total, 1)
        return np.log((n_ab + 1.0) / (expected + 1.0))

    def repeats(self, ids: np.ndarray) -> np.ndarray:
        """1 where a word equals one of the ``lags`` words before it."""
        out = np.zeros(len(ids), np.float64)
        for lag in range(1, self.lags + 1):
            out[lag:] = np.maximum(out[lag:], (ids[lag:] == ids[:-lag]) & (ids[lag:] >= 0))
        return out

    def score(self, docs: list[Document]) -> list[dict]:
        rows = []
        for d in docs:
            ids, starts = self._words(d.text)
            row = {"id": d.id, "order.disorder": 0.0, "order.disorder_start": 0, "order.repetition": 0.0,
                   "order.repetition_start": 0, "order.words": int(len(ids))}
            if len(ids) >= self.min_words:
                neg = -self.association(ids)
                row["order.disorder"], _ = window_max(neg, self.window)
                row["order.disorder_start"] = int(starts[step_up(neg)])
                rep = self.repeats(ids)
                row["order.repetition"], _ = window_max(rep, self.window)
                row["order.repetition_start"] = int(starts[step_up(rep)])
            rows.append(row)
        return rows


class CompressionScanner:
    """zlib compression ratio of character windows (compressed / raw bytes, the largest over
    windows): random text compresses badly. Needs no tokenizer and no fitting."""

    name = "compression"

    def __init__(self, window: int = 256):
        self.window = window

    def fit(self, docs: list[Document]) -> None:
        pass

    def score(self, docs: list[Document]) -> list[dict]:
        rows = []
        w = self.window
        for doc in docs:
            raw = doc.text.encode("utf-8", "surrogatepass")
            best = 0.0
            for s in range(0, max(len(raw) - w, 0) + 1, w // 2):
                chunk = raw[s : s + w]
                if len(chunk) >= 32:
                    best = max(best, len(zlib.compress(chunk, 6)) / len(chunk))
            rows.append({"id": doc.id, "compression.ratio": best})
        return rows


_WORD = re.compile(r"\w+", re.UNICODE)


class NearDuplicateScanner:
    """MinHash over word shingles with banded locality-sensitive hashing.

    Fields: ``cluster_size`` (documents in this document's near-duplicate cluster, itself
    included) and ``cluster`` (the id of the cluster's first document). Template poisons
    (one payload pasted behind many prefixes) form large clusters.
    """

    name = "near_duplicate"

    def __init__(self, shingle: int = 5, permutations: int = 64, bands: int = 16, seed: int = 0):
        if permutations % bands:
            raise ValueError("permutations must be a multiple of bands")
        self.shingle, self.bands, self.rows = shingle, bands, permutations // bands
        rng = np.random.default_rng(seed)
        self._prime = np.uint64((1 << 31) - 1)
        self._a = rng.integers(1, (1 << 31) - 1, size=permutations, dtype=np.uint64)
        self._b = rng.integers(0, (1 << 31) - 1, size=permutations, dtype=np.uint64)
        self._cluster: dict[str, tuple[str, int]] = {}

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        k = self.shingle
        grams = [" ".join(words[i : i + k]) for i in range(max(len(words) - k + 1, 1))]
        h = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        # universal hashing modulo the Mersenne prime 2^31 - 1: every product stays below 2^62
        return ((self._a * (h[:, None] % self._prime) + self._b) % self._prime).min(axis=0)

    def fit(self, docs: list[Document]) -> None:
        parent = list(range(len(docs)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        buckets: dict[tuple, int] = {}
        for i, d in enumerate(docs):
            sig = self.signature(d.text)
            for b in range(self.bands):
                key = (b, sig[b * self.rows : (b + 1) * self.rows].tobytes())
                j = buckets.setdefault(key, i)
                if j != i:
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
        size: dict[int, int] = defaultdict(int)
        roots = [find(i) for i in range(len(docs))]
        for r in roots:
            size[r] += 1
        self._cluster = {d.id: (docs[r].id, size[r]) for d, r in zip(docs, roots)}

    def score(self, docs: list[Document]) -> list[dict]:
        rows = []
        for d in docs:
            cid, n = self._cluster.get(d.id, (d.id, 1))
            rows.append({"id": d.id, "near_duplicate.cluster_size": n, "near_duplicate.cluster": cid})
        return rows


STOPWORDS = {
    "en": "the of and to in is that it for was on are as with be by this from at or have an not which but",
    "de": "der die und das ist nicht ein eine zu den mit sich des auf für im dem von sie auch es wird bei",
    "fr": "le la les de des et est une un du que pour dans qui pas sur au avec ce il par sont plus",
    "es": "el la de que y en los las del se por un una para con no es al lo como más pero sus",
    "it": "il di che la per non una sono del della con gli le si da nel alla anche come più questo",
    "nl": "de het een en van is dat niet op te zijn voor met die aan er ook als bij om maar",
    "pt": "de que não uma os do da em para com por mais as dos como mas ao ele das tem",
}
_STOP = {lang: set(words.split()) for lang, words in STOPWORDS.items()}


class LanguageShiftScanner:
    """Language of each window of ``window`` words by stopword counts (7 European languages),
    plus the share of non-Latin letters per window.

    Fields: ``shift`` (1 when a confidently identified window's language differs from the
    document's first identified language, or the non-Latin letter share jumps by more than
    0.5 between windows), ``languages`` (the languages seen, in order) and ``shift_start``
    (character where the first shift window starts).
    """

    name = "language_shift"

    def __init__(self, window: int = 40, min_hits: int = 4):
        self.window, self.min_hits = window, min_hits

    def fit(self, docs: list[Document]) -> None:
        pass

    def score(self, docs: list[Document]) -> list[dict]:
        return [self._one(d) for d in docs]

    def _one(self, doc: Document) -> dict:
        matches = list(_WORD.finditer(doc.text))
        langs: list[str] = []
        nonlatin: list[float] = []
        shift, start = 0, -1
        for s in range(0, len(matches), self.window):
            chunk = matches[s : s + self.window]
            words = [m.group().lower() for m in chunk]
            hits = {lang: sum(w in stop for w in words) for lang, stop in _STOP.items()}
            lang, n = max(hits.items(), key=lambda kv: kv[1])
            letters = [c for w in words for c in w if c.isalpha()]
            share = sum(not _latin(c) for c in letters) / len(letters) if letters else 0.0
            if n >= self.min_hits and sorted(hits.values())[-2] * 2 <= n:
                if langs and lang != langs[0] and not shift:
                    shift, start = 1, chunk[0].start()
                if not langs or langs[-1] != lang:
                    langs.append(lang)
            if nonlatin and abs(share - nonlatin[0]) > 0.5 and not shift:
                shift, start = 1, chunk[0].start()
            nonlatin.append(share)
        return {"id": doc.id, "language_shift.shift": shift, "language_shift.languages": ",".join(langs),
                "language_shift.shift_start": start}


def _latin(c: str) -> bool:
    return c < "\u0250" or "\u1e00" <= c <= "\u1eff"



def _script(ch: str) -> str:
    """A coarse script class of a character: the first word of its Unicode name (LATIN,
    CYRILLIC, CJK, ...), ``digit``, ``space`` or ``symbol``."""
    if ch.isspace():
        return "space"
    if ch.isdigit():
        return "digit"
    if not ch.isalpha():
        return "symbol"
    try:
        return unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return "unknown"


_UNBROKEN = re.compile(r"\S+")


def longest_unbroken(text: str) -> tuple[int, int]:
    """(length, character offset) of the longest run of characters without whitespace."""
    best = (0, 0)
    for m in _UNBROKEN.finditer(text):
        if m.end() - m.start() > best[0]:
            best = (m.end() - m.start(), m.start())
    return best


class ScriptScanner:
    """Script and byte statistics over character windows, whatever the tokenizer: the largest
    share of letters outside the document's main script (a payload of mixed scripts), the
    number of scripts in that window, and the longest run of characters without a space (a
    base64 or hex blob). Needs no fitting."""

    name = "script"

    def __init__(self, window: int = 200):
        self.window = window

    def fit(self, docs: list[Document]) -> None:
        pass

    def score(self, docs: list[Document]) -> list[dict]:
        rows = []
        w = self.window
        for doc in docs:
            scripts = [_script(c) for c in doc.text]
            letters = [s for s in scripts if s not in ("space", "digit", "symbol")]
            main = max(set(letters), key=letters.count) if letters else None
            foreign, kinds = 0.0, 0
            for s in range(0, max(len(scripts) - w, 0) + 1, w // 2):
                part = [x for x in scripts[s : s + w] if x not in ("space", "digit", "symbol")]
                if len(part) >= 20:
                    share = sum(x != main for x in part) / len(part)
                    if share > foreign:
                        foreign, kinds = share, len(set(part))
            longest = longest_unbroken(doc.text)[0]
            rows.append({"id": doc.id, "script.foreign_share": foreign, "script.kinds": kinds,
                         "script.longest_unbroken": longest})
        return rows
