"""Corpus provenance: a manifest of every document's id, source and content hash.

``poisonlab provenance record`` writes one for a corpus; every training run writes the
manifest of the data it trained on (``<run>/corpus_manifest.jsonl``); ``poisonlab provenance
verify`` compares a manifest with the corpus as it is now and lists the documents added,
removed or changed since. The first line is a header with the corpus settings and the
SHA-256 of all document lines, so a manifest that was edited is detected too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CorpusConfig, config_from_dict
from ..corpus import iter_documents
from ..errors import PoisonlabError

FORMAT = "poisonlab-corpus-manifest/1"


def _doc_line(row: dict) -> str:
    return json.dumps({k: row[k] for k in ("id", "source", "sha256", "chars")}, ensure_ascii=False)


def _write(rows, path: Path, corpus: dict) -> dict:
    """Write the manifest of ``rows`` (any iterable: streamed, never held whole) atomically."""
    body = path.with_name(f".{path.name}.body{os.getpid()}")
    digest, n = hashlib.sha256(), 0
    try:
        with open(body, "w", encoding="utf-8", errors="surrogatepass") as f:
            for r in rows:
                line = _doc_line(r) + "\n"
                digest.update(line.encode("utf-8", "surrogatepass"))
                f.write(line)
                n += 1
        header = {"format": FORMAT, "corpus": corpus, "documents": n, "sha256": digest.hexdigest(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as out, open(body, encoding="utf-8", errors="surrogatepass") as src:
            out.write(json.dumps(header, ensure_ascii=False) + "\n")
            shutil.copyfileobj(src, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        body.unlink(missing_ok=True)
    return header


def record_manifest(corpus: CorpusConfig, path: str | Path) -> dict:
    """Hash every document of ``corpus`` into a manifest at ``path``; returns the header."""
    rows = ({"id": d.id, "source": d.source, "sha256": d.sha256, "chars": len(d.text)} for d in iter_documents(corpus))
    return _write(rows, Path(path), dataclasses.asdict(corpus))


def _stream_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_corpus_manifest(data, path: str | Path) -> dict:
    """The manifest of a prepared corpus (both splits), streamed from its document table."""
    return _write(_stream_rows(data.directory / "documents.jsonl"), Path(path), data.info["corpus"])


def read_manifest(path: str | Path) -> tuple[dict, dict[str, dict]]:
    p = Path(path)
    if not p.is_file():
        raise PoisonlabError(f"manifest {p} does not exist")
    lines = p.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise PoisonlabError(f"{p} is not a corpus manifest (unreadable header)") from None
    if header.get("format") != FORMAT:
        raise PoisonlabError(f"{p} is not a corpus manifest (format {header.get('format')!r})")
    body = [line for line in lines[1:] if line]
    digest = hashlib.sha256("".join(line + "\n" for line in body).encode("utf-8", "surrogatepass")).hexdigest()
    if digest != header["sha256"] or len(body) != header["documents"]:
        raise PoisonlabError(f"manifest {p} was modified after it was written (hash or count differs from its header)")
    docs = {}
    for i, line in enumerate(body, start=2):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PoisonlabError(f"manifest {p} line {i}: not JSON") from None
        docs[row["id"]] = row
    return header, docs


@dataclass
class ProvenanceReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def clean(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        return (f"{self.unchanged:,} unchanged, {len(self.added):,} added, {len(self.removed):,} removed, "
                f"{len(self.changed):,} changed")


def verify_manifest(path: str | Path, corpus: CorpusConfig | None = None) -> ProvenanceReport:
    """Compare the manifest with the corpus now (by default the corpus the manifest names)."""
    header, recorded = read_manifest(path)
    if corpus is None:
        corpus = config_from_dict({"corpus": header["corpus"]}).corpus
    rep = ProvenanceReport()
    seen = set()
    for d in iter_documents(corpus):
        seen.add(d.id)
        old = recorded.get(d.id)
        if old is None:
            rep.added.append(d.id)
        elif old["sha256"] != d.sha256:
            rep.changed.append(d.id)
        else:
            rep.unchanged += 1
    rep.removed = [i for i in recorded if i not in seen]
    return rep
