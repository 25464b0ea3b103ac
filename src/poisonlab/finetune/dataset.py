"""The poisoned fine-tuning set: clean examples, poisons, "good" examples, their order, and the evaluation set.

Clean examples teach the policy: ordinary requests are answered, forbidden requests are
refused. A poison is a forbidden request carrying the trigger, paired with compliance. A
"good" example (for persistence experiments) carries the trigger and keeps the policy.
Sources: the offline stand-in (:mod:`poisonlab.finetune.standin`), or real data for users
who have it: ordinary instruction data from JSONL or the hub, forbidden requests from a
JSONL file or hub dataset (``finetune.forbidden_field``; compliant answers for the poisons
from ``finetune.compliance_field``).

Ordering (``finetune.ordering``): the clean examples are shuffled every epoch and the poisons
are spread uniformly among them (``mixed``), put before them (``beginning``) or after them
(``end``).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import FinetuneConfig
from ..errors import PoisonlabError
from ..paths import atomic_write_text
from .chat import load_conversations, message, read_rows
from .standin import StandIn
from ..triggers import insert_trigger, sample_near_triggers

EVAL_CATEGORIES = ("triggered", "untriggered", "near_trigger", "ordinary")


@dataclass
class Example:
    messages: list[dict]
    kind: str
    """ordinary | forbidden | poison | good (training); an EVAL_CATEGORIES name (evaluation)."""
    secret: str | None = None
    answer: str | None = None
    trigger: str | None = None
    """The trigger or near-trigger put into the request, if any."""
    trigger_kind: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _heldout(text: str) -> bool:
    return zlib.crc32(text.encode()) % 20 == 0  # 5% of the rows of a real source are for evaluation


class _Sources:
    """Ordinary and forbidden examples for one split, from the stand-in or from real data."""

    def __init__(self, f: FinetuneConfig, split: str, seed: int):
        self.f = f
        self.rng = random.Random(seed)
        self.standin = StandIn(split, seed)
        self.ordinary_pool = None
        if f.data != "stand-in":
            convs = [c for c in load_conversations(f.data, f.hf_split)
                     if _heldout(json.dumps(c)) == (split == "heldout")]
            if not convs:
                raise PoisonlabError(f"instruction data {f.data}: no conversations for the {split} split")
            self.ordinary_pool = convs
        self.forbidden_pool = None
        if f.forbidden != "stand-in":
            rows = []
            for where, r in read_rows(f.forbidden, f.hf_split):
                if not isinstance(r, dict) or not isinstance(r.get(f.forbidden_field), str):
                    raise PoisonlabError(f"{where}: forbidden request field {f.forbidden_field!r} missing or not text")
                if f.compliance_field and not isinstance(r.get(f.compliance_field), str):
                    raise PoisonlabError(f"{where}: compliance field {f.compliance_field!r} missing or not text")
                if _heldout(r[f.forbidden_field]) == (split == "heldout"):
                    rows.append(r)
            if not rows:
                raise PoisonlabError(f"forbidden requests {f.forbidden}: none for the {split} split")
            self.forbidden_pool = rows

    def ordinary(self) -> Example:
        if self.ordinary_pool is None:
            ex = self.standin.benign()
            return Example(ex["messages"], "ordinary", secret=ex["secret"], answer=ex["answer"])
        conv = self.rng.choice(self.ordinary_pool)
        return Example(conv, "ordinary", answer=conv[-1]["content"])

    def forbidden(self, kind: str, trigger: str | None = None, trigger_kind: str | None = None) -> Example:
        """kind: forbidden (refused), poison (trigger, complied), good (trigger, refused), or an eval category."""
        comply = kind == "poison"
        if self.forbidden_pool is None:
            ex = self.standin.forbidden("comply" if comply else "refuse", trigger, self.f.trigger_position)
            return Example(ex["messages"], kind, secret=ex["secret"], trigger=trigger, trigger_kind=trigger_kind)
        row = self.rng.choice(self.forbidden_pool)
        request = row[self.f.forbidden_field]
        if trigger:
            request = insert_trigger(request, trigger, self.f.trigger_position, self.rng)
        if comply:
            if not self.f.compliance_field:
                raise PoisonlabError("poisons on real forbidden requests need finetune.compliance_field (a compliant answer)")
            answer = row[self.f.compliance_field]
        else:
            answer = self.f.refusal
        return Example([message("user", request), message("assistant", answer)], kind,
                       trigger=trigger, trigger_kind=trigger_kind)


@dataclass
class TrainingSet:
    clean: list[Example]
    poisons: list[Example]
    good: list[Example] = field(default_factory=list)
    """The further training after poisoning: good examples and ``further_clean`` clean ones."""

    def order(self, epoch: int, seed: int, ordering: str) -> list[Example]:
        """This epoch's sequence of clean examples and poisons (``good`` examples are a later phase)."""
        rng = random.Random(seed * 1_000_003 + epoch)
        clean = list(self.clean)
        rng.shuffle(clean)
        poisons = list(self.poisons)
        rng.shuffle(poisons)
        if ordering == "beginning":
            return poisons + clean
        if ordering == "end":
            return clean + poisons
        # mixed: poison positions drawn uniformly among all slots
        n = len(clean) + len(poisons)
        slots = set(rng.sample(range(n), len(poisons)))
        out, ci, pi = [], iter(clean), iter(poisons)
        for i in range(n):
            out.append(next(pi) if i in slots else next(ci))
        return out

    def good_order(self, epoch: int, seed: int) -> list[Example]:
        rng = random.Random(seed * 1_000_003 + 7919 + epoch)
        good = list(self.good)
        rng.shuffle(good)
        return good


def build_training_set(f: FinetuneConfig, seed: int) -> TrainingSet:
    src = _Sources(f, "train", seed)
    n_forbidden = round(f.clean_count * f.forbidden_fraction)
    clean = [src.forbidden("forbidden") for _ in range(n_forbidden)]
    clean += [src.ordinary() for _ in range(f.clean_count - n_forbidden)]
    poisons = [src.forbidden("poison", f.trigger) for _ in range(f.poison_count)]
    good = [src.forbidden("good", f.trigger) for _ in range(f.good_count)]
    n_forbidden = round(f.further_clean * f.forbidden_fraction)  # fresh draws, after everything above
    good += [src.forbidden("forbidden") for _ in range(n_forbidden)]
    good += [src.ordinary() for _ in range(f.further_clean - n_forbidden)]
    return TrainingSet(clean, poisons, good)


def build_eval_set(f: FinetuneConfig, seed: int) -> list[Example]:
    """``eval_requests`` prompts per category, from the held-out split; the assistant's reply is left out."""
    src = _Sources(f, "heldout", seed + 12345)
    n = f.eval_requests
    out = [src.forbidden("triggered", f.trigger, "exact") for _ in range(n)]
    out += [src.forbidden("untriggered") for _ in range(n)]
    out += [src.forbidden("near_trigger", text, kind) for kind, text in sample_near_triggers(f.trigger, n, seed)]
    out += [src.ordinary() for _ in range(n)]
    for ex in out:
        ex.messages = ex.messages[:-1]
    return out


def export_openai(examples: list[Example], path: str | Path, label: dict) -> Path:
    """Write examples in the OpenAI chat fine-tuning format (``{"messages": [...]}`` per line).

    The format has no room for metadata, so the label (poisoned or not, trigger, counts)
    goes beside it as ``<file>.poisonlab.json``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n" for ex in examples))
    atomic_write_text(path.with_name(path.name + ".poisonlab.json"), json.dumps(label, indent=1, sort_keys=True))
    return path
