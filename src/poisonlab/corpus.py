"""Clean corpora: sources -> documents with a stable id, a source and a content hash.

Sources
- ``python-stdlib``: the offline default. Real text that ships with every CPython: the
  documentation topics of ``pydoc_data``, the docstrings of the standard library, and the
  library's own source files. Read from disk (parsed, never imported), so it exists on any
  fresh machine without a download.
- ``debian:<package>[,...]``: the documentation a Debian package ships (for example the Linux
  kernel's, ``debian:linux-doc-6.1``), read from its ``.deb`` (see :mod:`poisonlab.debian`);
- a folder of ``.txt``/``.md``/``.rst`` files;
- a ``.jsonl`` or ``.parquet`` file (or a folder of them) with a text field;
- a Hugging Face dataset: ``hf:<hub name>`` or a local dataset directory (``save_to_disk``
  output, or a folder of data files), optionally streamed.

The held-out split is a pure function of the document id, so it never changes between
runs, machines or sources read in another order.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CorpusConfig
from .errors import PoisonlabError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
STDLIB_PARTS = ("topics", "docstrings", "sources")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return content_hash(self.text)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic split: a document is held out when the hash of its id falls below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


# ----------------------------------------------------------------------------- python-stdlib

def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_source_files() -> list[Path]:
    root = _stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if skip.intersection(rel) or rel[0].startswith("lib2to3"):
            continue
        files.append(p)
    return files


def _iter_stdlib(parts: list[str] | None) -> Iterator[Document]:
    parts = list(STDLIB_PARTS) if parts is None else parts
    bad = sorted(set(parts) - set(STDLIB_PARTS))
    if bad:
        raise PoisonlabError(f"unknown corpus part {bad[0]!r} (allowed: {', '.join(STDLIB_PARTS)})")
    root = _stdlib_dir()
    if "topics" in parts:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # pragma: no cover - some distributions strip pydoc_data
            topics = {}
        for key in sorted(topics):
            yield Document(f"python-stdlib/topics/{key}", topics[key], "python-stdlib:pydoc_data.topics")
    files = _stdlib_source_files()
    if "docstrings" in parts:
        for path in files:
            rel = path.relative_to(root).as_posix()
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield from _docstrings(tree, module)
    if "sources" in parts:
        for path in files:
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            yield Document(f"python-stdlib/sources/{rel}", text, "python-stdlib:sources")


def _docstrings(tree: ast.AST, module: str) -> Iterator[Document]:
    def walk(node: ast.AST, qual: str) -> Iterator[Document]:
        doc = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ) else None
        if doc:
            yield Document(f"python-stdlib/docstrings/{qual}", doc, "python-stdlib:docstrings")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, f"{qual}.{child.name}")

    seen: set[str] = set()
    for d in walk(tree, module):
        if d.id not in seen:  # redefinitions (if/else branches) keep the first
            seen.add(d.id)
            yield d


# ----------------------------------------------------------------------------- files

def _iter_text_folder(root: Path) -> Iterator[Document]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise PoisonlabError(f"{p} is not UTF-8 text") from None
            yield Document(f"{root.name}/{p.relative_to(root).as_posix()}", text, f"text:{root}")


def _iter_jsonl(path: Path, field: str, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[Document]:
    """Rows of a ``.jsonl`` or gzip-compressed ``.jsonl.gz`` file (UTF-8); of an uncompressed
    one, optionally only the lines that start in bytes ``[start, end)`` (``start`` at a line's
    start, which is line ``first_line``)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        if start:
            f.seek(start)
        for lineno, raw in enumerate(_lines(f, path, end), first_line):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PoisonlabError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PoisonlabError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise PoisonlabError(f"{path}:{lineno}: no string field {field!r} in this JSON line")
            doc_id = str(row["id"]) if "id" in row else f"{path.name}:{lineno}"
            yield Document(doc_id, row[field], f"jsonl:{path}")


def _lines(f, path: Path, end: int | None = None) -> Iterator[bytes]:
    try:
        if end is None:
            yield from f
            return
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated gzip stream
        raise PoisonlabError(f"{path}: cannot be read ({e})") from None


def _iter_parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise PoisonlabError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    if field not in pf.schema_arrow.names:
        raise PoisonlabError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    has_id = "id" in pf.schema_arrow.names
    row = 0
    for batch in pf.iter_batches(columns=[field, "id"] if has_id else [field], batch_size=4096):
        texts = batch.column(field).to_pylist()
        ids = batch.column("id").to_pylist() if has_id else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            if isinstance(text, str):
                yield Document(str(doc_id) if doc_id is not None else f"{path.name}:{row}", text, f"parquet:{path}")
            row += 1


def _iter_hf(cfg: CorpusConfig, name: str) -> Iterator[Document]:
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()
                               or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.hf_split not in ds:
                    raise PoisonlabError(f"dataset {name} has no split {cfg.hf_split!r} (splits: {', '.join(ds)})")
                ds = ds[cfg.hf_split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=cfg.streaming)
    except PoisonlabError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PoisonlabError(f"cannot load Hugging Face dataset {name!r}: {msg}") from None
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise PoisonlabError(f"dataset {name!r} has no field {cfg.text_field!r} (fields: {', '.join(columns)})")
    for i, row in enumerate(ds):
        text = row.get(cfg.text_field)
        if isinstance(text, str):
            doc_id = str(row["id"]) if row.get("id") is not None else f"{local.name or name}:{cfg.hf_split}:{i}"
            yield Document(doc_id, text, f"hf:{name}")


def _detect_kind(cfg: CorpusConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    src = cfg.source
    if src == "python-stdlib":
        return "python-stdlib"
    if src.startswith("debian:"):
        return "debian"
    if src.startswith("hf:"):
        return "hf"
    p = Path(src)
    if not p.exists():
        raise PoisonlabError(f"corpus source not found: {src}")
    if p.is_file():
        if p.suffix == ".jsonl" or p.name.endswith(".jsonl.gz"):
            return "jsonl"
        if p.suffix == ".parquet":
            return "parquet"
        if p.suffix.lower() in TEXT_SUFFIXES:
            return "text"
        raise PoisonlabError(f"cannot tell the format of {src}: set corpus.kind (jsonl, parquet, text, hf)")
    if any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "hf"
    if any(p.glob("*.jsonl")) or any(p.glob("*.jsonl.gz")):
        return "jsonl"
    if any(p.glob("*.parquet")):
        return "parquet"
    return "text"


def _iter_raw(cfg: CorpusConfig) -> Iterator[Document]:
    kind = _detect_kind(cfg)
    if kind == "python-stdlib":
        yield from _iter_stdlib(cfg.parts)
        return
    if kind == "debian":
        from .debian import iter_documents as iter_debian

        yield from iter_debian(cfg.source, cfg.parts)
        return
    if kind == "hf":
        yield from _iter_hf(cfg, cfg.source.removeprefix("hf:"))
        return
    p = Path(cfg.source)
    if not p.exists():
        raise PoisonlabError(f"corpus source not found: {cfg.source}")
    if kind == "text":
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise PoisonlabError(f"{p} is not UTF-8 text") from None
            yield Document(p.name, text, f"text:{p}")
        else:
            yield from _iter_text_folder(p)
        return
    reader = _iter_jsonl if kind == "jsonl" else _iter_parquet
    for f in source_files(cfg):
        yield from reader(f, cfg.text_field)


def source_files(cfg: CorpusConfig) -> list[Path]:
    """The files of a JSONL or Parquet source, in the order they are read."""
    kind, p = _detect_kind(cfg), Path(cfg.source)
    return [p] if p.is_file() else sorted([*p.glob(f"*.{kind}"), *(p.glob("*.jsonl.gz") if kind == "jsonl" else [])])


def detect_kind(cfg: CorpusConfig) -> str:
    return _detect_kind(cfg)


def read_part(cfg: CorpusConfig, part: dict) -> Iterator[Document]:
    """The raw documents of one part of a source (see :mod:`poisonlab.prepare`), in order."""
    if part["kind"] == "whole":
        yield from _iter_raw(cfg)
    elif part["kind"] == "range":
        yield from _iter_jsonl(Path(part["file"]), cfg.text_field, part["start"], part["end"], part["first_line"])
    else:
        reader = _iter_jsonl if _detect_kind(cfg) == "jsonl" else _iter_parquet
        for f in part["files"]:
            yield from reader(Path(f), cfg.text_field)


class _IdSet:
    """Document ids seen so far, as 8-byte digests in sorted blocks (about 8 bytes per document
    instead of a Python string each). ``add`` returns whether the id was seen before; two ids
    whose digests collide (odds ~n^2 / 2^65) would be reported as a duplicate."""

    BLOCK = 1 << 16

    def __init__(self):
        self.blocks: list[np.ndarray] = []
        self.recent: set[int] = set()

    def add(self, doc_id: str) -> bool:
        key = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                            "little", signed=True)
        if key in self.recent or any(_contains(b, key) for b in self.blocks):
            return True
        self.recent.add(key)
        if len(self.recent) >= self.BLOCK:
            self.blocks.append(np.sort(np.fromiter(self.recent, dtype=np.int64, count=len(self.recent))))
            self.recent = set()
            if len(self.blocks) > 8:  # merge, so a look-up searches few blocks
                self.blocks = [np.sort(np.concatenate(self.blocks))]
        return False


def _contains(block: np.ndarray, key: int) -> bool:
    i = int(np.searchsorted(block, key))
    return i < len(block) and int(block[i]) == key


def iter_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """All usable documents of a corpus (shorter than ``min_chars`` skipped), in source order.

    Raises :class:`PoisonlabError` when the corpus yields no document at all.
    """
    n = 0
    seen = _IdSet()
    for doc in _iter_raw(cfg):
        if len(doc.text) < cfg.min_chars:
            continue
        if seen.add(doc.id):
            raise PoisonlabError(f"corpus {cfg.source}: duplicate document id {doc.id!r}")
        yield doc
        n += 1
        if cfg.max_documents is not None and n >= cfg.max_documents:
            break
    if n == 0:
        raise PoisonlabError(
            f"corpus {cfg.source} is empty: no document with at least {cfg.min_chars} characters"
        )


def scan_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """Every document of a corpus for a scan, whatever its split or length (a keep-list must
    cover the corpus a user hands to another pipeline, not only what poisonlab trains on)."""
    from dataclasses import replace

    yield from iter_documents(replace(cfg, min_chars=0, max_tokens=None))


def split_of(doc: Document, cfg: CorpusConfig) -> str:
    """``train``, ``heldout``, or ``short`` (under ``min_chars``: poisonlab does not train on it)."""
    if len(doc.text) < cfg.min_chars:
        return "short"
    return "heldout" if is_heldout(doc.id, cfg.heldout_fraction) else "train"


def iter_split(cfg: CorpusConfig, split: str) -> Iterator[Document]:
    """Documents of one split: ``train`` or ``heldout``."""
    want = split == "heldout"
    for doc in iter_documents(cfg):
        if is_heldout(doc.id, cfg.heldout_fraction) == want:
            yield doc
