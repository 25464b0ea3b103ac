"""Injection plans and the training stream: poisons spliced into the clean token stream.

The corpus is never rewritten. A run's training stream is the clean training documents in
a seeded order (a new order each epoch), with every poison inserted whole at a planned
document boundary. The plan (the manifest) gives each poison's offset in the stream and the
optimizer step that consumes its last token, so ``poisons_seen(step)`` is exact.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import PoisonlabError
from .shards import TokenStore


class ShuffledDocuments:
    """The clean training stream: documents of a :class:`TokenStore` in a seeded order per epoch."""

    def __init__(self, store: TokenStore, seed: int, keep: np.ndarray | None = None):
        """``keep``: a boolean mask over the store's documents (a filtered corpus); default all."""
        self.store = store
        self.seed = seed
        self._docs = np.arange(store.n_documents) if keep is None else np.flatnonzero(keep)
        if len(self._docs) == 0:
            raise PoisonlabError("no clean training document is left to train on")
        self.length = int(store.doc_lengths[self._docs].sum())
        self._epoch = -1
        self._order = self._ends = None

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, 0x5EED, epoch])
            self._order = self._docs[rng.permutation(len(self._docs))]
            self._ends = np.cumsum(self.store.doc_lengths[self._order])
            self._epoch = epoch

    def read(self, pos: int, n: int, out: np.ndarray) -> None:
        """Fill ``out[:n]`` with clean-stream tokens starting at clean position ``pos``."""
        filled = 0
        while filled < n:
            epoch, r = divmod(pos + filled, self.length)
            self._load_epoch(epoch)
            k = int(np.searchsorted(self._ends, r, side="right"))
            doc = int(self._order[k])
            doc_start_in_epoch = int(self._ends[k] - self.store.doc_lengths[doc])
            off = r - doc_start_in_epoch
            take = min(n - filled, int(self.store.doc_lengths[doc]) - off)
            out[filled : filled + take] = self.store.read(int(self.store.doc_starts[doc]) + off, take)
            filled += take

    def documents_read(self, n_tokens: int) -> np.ndarray:
        """Indices of the documents the first ``n_tokens`` clean-stream tokens touch (sorted)."""
        if n_tokens <= 0:
            return np.zeros(0, dtype=np.int64)
        epochs, r = divmod(n_tokens, self.length)
        if epochs:
            return np.sort(self._docs).astype(np.int64)
        self._load_epoch(0)
        k = int(np.searchsorted(self._ends, r - 1, side="right"))
        return np.sort(self._order[: k + 1]).astype(np.int64)

    def next_boundary(self, pos: int) -> int:
        """The first document start at or after clean position ``pos``."""
        epoch, r = divmod(pos, self.length)
        self._load_epoch(epoch)
        k = int(np.searchsorted(self._ends, r, side="left"))
        if k < len(self._ends) and self._ends[k] == r:
            return pos
        start = 0 if k == 0 else int(self._ends[k - 1])
        if start == r:
            return pos
        return epoch * self.length + int(self._ends[k])


@dataclass
class PlacedPoison:
    poison_id: str
    index: int
    stream_offset: int
    tokens: int
    step: int
    """0-based optimizer step whose batch holds the poison's last token."""


@dataclass
class BatchPlacement:
    """Poisons by batch: in a poisoned batch, ``share`` of the sequences begin with a poison;
    a batch is poisoned every ``every``-th step from ``start``, or, with ``probability``, at
    random (seeded). Each poison fills at most one sequence."""
    share: float
    every: int = 1
    start: int = 0
    probability: float | None = None


@dataclass
class InjectionPlan:
    placement: str
    budget_tokens: int
    tokens_per_step: int
    poisons: list[PlacedPoison]
    batch: dict | None = None
    """For ``batch`` placement: its settings and ``poisons_per_step`` ({step: poisons in its batch})."""

    def poisons_seen(self, steps_done: int) -> int:
        """Poisons whose every token has been trained on after ``steps_done`` optimizer steps."""
        return bisect_right(self._steps, steps_done - 1)

    @cached_property
    def _steps(self) -> list[int]:
        return sorted(p.step for p in self.poisons)

    def poison_tokens(self) -> int:
        return sum(p.tokens for p in self.poisons)

    def save(self, path: str | Path) -> None:
        from .paths import atomic_write_text

        head = {"placement": self.placement, "budget_tokens": self.budget_tokens,
                "tokens_per_step": self.tokens_per_step, "poison_count": len(self.poisons)}
        if self.batch is not None:
            head["batch"] = self.batch
        lines = [json.dumps(head)] + [json.dumps(asdict(p)) for p in self.poisons]
        atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "InjectionPlan":
        lines = Path(path).read_text().splitlines()
        head = json.loads(lines[0])
        poisons = [PlacedPoison(**json.loads(line)) for line in lines[1:]]
        return cls(head["placement"], head["budget_tokens"], head["tokens_per_step"], poisons, head.get("batch"))

    def poisons_per_step(self) -> dict[int, int]:
        """How many poisons each optimizer step's batch holds whole (steps without any left out)."""
        out: dict[int, int] = {}
        for p in self.poisons:
            out[p.step] = out.get(p.step, 0) + 1
        return out


def plan_injection(
    poison_lengths: list[int], budget_tokens: int, tokens_per_step: int, placement: str,
    seed: int, clean: ShuffledDocuments | None = None, batch: BatchPlacement | None = None,
    seq_len: int | None = None,
) -> InjectionPlan:
    """Place poisons of the given lengths in a stream of ``budget_tokens`` tokens.

    ``uniform``: each poison's clean-stream position is uniform over the clean tokens of the
    budget (snapped forward to a document boundary when ``clean`` is given); ``beginning`` /
    ``end``: all poisons back to back at the start / finishing at the end of the budget;
    ``batch``: poisons at the starts of sequences of chosen batches (see :class:`BatchPlacement`;
    needs ``seq_len``, and no poison longer than a sequence).
    """
    if placement == "batch":
        if batch is None or seq_len is None:
            raise PoisonlabError("batch placement needs its settings and the sequence length")
        return _plan_by_batch(poison_lengths, budget_tokens, tokens_per_step, seq_len, seed, batch)
    total = int(sum(poison_lengths))
    clean_tokens = budget_tokens - total
    if clean_tokens < 0:
        raise PoisonlabError(
            f"the poisons need {total:,} tokens but the token budget is only {budget_tokens:,}"
        )
    n = len(poison_lengths)
    rng = np.random.default_rng([seed, 0x1A7E])
    order = rng.permutation(n)  # which poison goes in which slot
    if placement == "uniform":
        clean_pos = np.sort(rng.integers(0, clean_tokens + 1, size=n))
        if clean is not None:
            clean_pos = np.array([min(clean.next_boundary(int(p)), clean_tokens) for p in clean_pos])
    elif placement == "beginning":
        clean_pos = np.zeros(n, dtype=np.int64)
    elif placement == "end":
        clean_pos = np.full(n, clean_tokens, dtype=np.int64)
    else:
        raise PoisonlabError(f"unknown placement {placement!r} (allowed: uniform, beginning, end, batch)")
    placed = []
    before = 0
    for slot in range(n):
        i = int(order[slot])
        offset = int(clean_pos[slot]) + before
        length = int(poison_lengths[i])
        placed.append(PlacedPoison(f"poison-{i:06d}", i, offset, length, (offset + length - 1) // tokens_per_step))
        before += length
    return InjectionPlan(placement, budget_tokens, tokens_per_step, placed)


def _plan_by_batch(poison_lengths: list[int], budget_tokens: int, tokens_per_step: int, seq_len: int, seed: int,
                   batch: BatchPlacement) -> InjectionPlan:
    n = len(poison_lengths)
    rows = tokens_per_step // seq_len
    per_batch = max(1, int(round(batch.share * rows)))
    longest = max(poison_lengths, default=0)
    if longest > seq_len:
        raise PoisonlabError(f"batch placement puts each poison in one sequence, but a poison has {longest} tokens "
                             f"and train.seq_len is {seq_len}: shorten the poisons (attack.prefix_chars, "
                             f"attack.gibberish_tokens) or raise the sequence length")
    steps = budget_tokens // tokens_per_step
    rng = np.random.default_rng([seed, 0xBA7C])
    order = rng.permutation(n)
    placed: list[PlacedPoison] = []
    slot = 0
    for step in range(batch.start, steps):
        if slot >= n:
            break
        if batch.probability is not None:
            if rng.random() >= batch.probability:
                continue
        elif (step - batch.start) % batch.every:
            continue
        take = min(per_batch, n - slot)
        for r in sorted(rng.choice(rows, size=take, replace=False).tolist()):
            i = int(order[slot])
            offset = step * tokens_per_step + r * seq_len
            placed.append(PlacedPoison(f"poison-{i:06d}", i, offset, int(poison_lengths[i]), step))
            slot += 1
    if slot < n:
        raise PoisonlabError(f"batch placement fits {slot:,} of {n:,} poisons in the budget's {steps:,} steps "
                             f"({per_batch} per poisoned batch); raise attack.batch_share or poison more often")
    # the stream is the clean text with the poisons inserted: a later poison's offset counts the earlier ones
    info = {"share": batch.share, "every": batch.every, "start": batch.start, "probability": batch.probability,
            "sequences_per_batch": rows, "poisons_per_poisoned_batch": per_batch}
    plan = InjectionPlan("batch", budget_tokens, tokens_per_step, placed, info)
    info["poisons_per_step"] = {str(k): v for k, v in sorted(plan.poisons_per_step().items())}
    return plan


class TrainingStream:
    """The poisoned training stream: clean documents with the plan's poisons spliced in."""

    def __init__(self, clean: ShuffledDocuments, plan: InjectionPlan, poison_ids: list[np.ndarray]):
        self.clean = clean
        self.starts = [p.stream_offset for p in plan.poisons]
        self.ends = [p.stream_offset + p.tokens for p in plan.poisons]
        self.tokens = [np.asarray(poison_ids[p.index], dtype=np.int64) for p in plan.poisons]
        self.before = np.cumsum([0] + [p.tokens for p in plan.poisons]).tolist()

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        pos, filled = start, 0
        i = bisect_right(self.ends, pos)  # first poison not entirely before pos
        while filled < n:
            if i < len(self.starts) and self.starts[i] <= pos:
                off = pos - self.starts[i]
                take = min(self.ends[i] - pos, n - filled)
                out[filled : filled + take] = self.tokens[i][off : off + take]
                if pos + take >= self.ends[i]:
                    i += 1
            else:
                limit = self.starts[i] if i < len(self.starts) else pos + (n - filled)
                take = min(limit - pos, n - filled)
                self.clean.read(pos - self.before[i], take, out[filled : filled + take])
            pos += take
            filled += take
        return out

    def batch(self, step: int, batch_size: int, seq_len: int, rows: range | None = None) -> np.ndarray:
        """Rows of optimizer step ``step``: each ``seq_len + 1`` tokens (inputs and shifted targets)."""
        base = step * batch_size * seq_len
        rows = range(batch_size) if rows is None else rows
        return np.stack([self.read(base + r * seq_len, seq_len + 1) for r in rows])
