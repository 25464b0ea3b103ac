"""Scan a run's training data before training and drop what the scan flags.

With ``defense.filter: scan`` a run scans exactly what it would train on (its clean training
documents and its poisons), writes the scores, mined triggers and keep-list to
``<run>/defense/``, injects only the poisons that survive and reads only the clean
documents that survive. ``run.json`` records what was removed, so the backdoor measured
afterwards is the downstream effect of the filter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..corpus import Document, iter_split
from ..data import PreparedData
from ..errors import PoisonlabError
from ..jsonl import read_jsonl
from .evaluation import confusion
from .pipeline import detect, write_detection


def train_document_ids(data: PreparedData) -> list[str]:
    """Ids of the prepared training documents, in the order of the token store."""
    return [r["id"] for r in read_jsonl(data.directory / "documents.jsonl") if r["split"] == "train"]


def filter_training_data(cfg: RunConfig, data: PreparedData, poisons: list, run_dir: Path):
    """(surviving poisons, keep mask over the clean training documents, summary for run.json)."""
    expected = {r["id"]: r["sha256"] for r in read_jsonl(data.directory / "documents.jsonl") if r["split"] == "train"}
    clean = list(iter_split(cfg.corpus, "train"))
    changed = [d.id for d in clean if expected.get(d.id) != d.sha256]
    if changed or len(clean) != len(expected):
        raise PoisonlabError(f"corpus {cfg.corpus.source} changed since it was prepared "
                             f"({len(changed)} documents differ); prepare it again")
    docs = clean + [Document(p.id, p.text, "poison") for p in poisons]
    det = detect(docs, cfg.defense, data.tokenizer, progress=cfg.train.progress)
    write_detection(det, run_dir / "defense")
    summary = confusion(det.flagged, {p.id for p in poisons}, docs)
    summary["mined_triggers"] = [t.record() for t in det.triggers[:5]]
    summary["used_triggers"] = det.used_triggers
    kept = [p for p in poisons if p.id not in det.flagged]
    return kept, keep_mask(data, run_dir), summary


def remove_listed(cfg: RunConfig, data: PreparedData, poisons: list, run_dir: Path):
    """``defense.filter: list``: drop the documents ``defense.remove`` names. Returns what
    :func:`filter_training_data` returns; the keep-list and the removed ids are written to
    ``<run>/defense/`` so a resumed run reads the same documents."""
    import hashlib

    from ..paths import atomic_write_text

    path = Path(cfg.defense.remove or "")
    if not cfg.defense.remove or not path.is_file():
        raise PoisonlabError(f"defense.filter: list needs defense.remove to name a file of document ids "
                             f"({cfg.defense.remove!r} is not a file)")
    raw = path.read_bytes()
    listed = {line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()}
    clean_ids = train_document_ids(data)
    known = set(clean_ids) | {p.id for p in poisons}
    unknown = sorted(listed - known)
    if unknown:
        raise PoisonlabError(f"{path}: {len(unknown)} ids are neither training documents nor poisons of this run "
                             f"(first: {unknown[0]!r}); was the list made for another run?")
    kept = [p for p in poisons if p.id not in listed]
    keep = [i for i in clean_ids if i not in listed]
    out = run_dir / "defense"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "keep_list.txt", "\n".join(keep))
    atomic_write_text(out / "removed.txt", "\n".join(sorted(listed)) + "\n")
    summary = {"filter": "list", "list": str(path), "list_sha256": hashlib.sha256(raw).hexdigest(),
               "poisons": len(poisons), "flagged": len(listed), "poisons_surviving": len(kept),
               "clean_documents_lost": len(clean_ids) - len(keep)}
    return kept, keep_mask(data, run_dir), summary


def keep_mask(data: PreparedData, run_dir: Path) -> np.ndarray | None:
    """The run's mask over clean training documents, or None when the run filters nothing."""
    path = run_dir / "defense" / "keep_list.txt"
    if not path.is_file():
        return None
    keep = set(path.read_text().split("\n"))
    return np.array([i in keep for i in train_document_ids(data)], dtype=bool)
