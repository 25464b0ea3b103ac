"""Prepared data: a corpus split, its tokenizer and its token shards, built once and cached.

``prepare_data`` reads the corpus twice (once to train the tokenizer on the training split,
once to tokenize both splits into shards) and writes everything into a cache folder named
by a hash of the corpus and tokenizer settings. The folder is built under a temporary name
and renamed when complete, so a killed preparation never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import CorpusConfig, TokenizerConfig
from .corpus import is_heldout, iter_documents, iter_split
from .errors import PoisonlabError
from .jsonl import read_json, read_jsonl, write_jsonl
from .paths import atomic_write_text
from .shards import ShardWriter, TokenStore
from .tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: special-token strings in documents are encoded as plain text
PREFIX_BANK_CHARS = 4096
PREFIX_BANK_SIZE = 20_000
ENCODE_BATCH = 512


@dataclass
class PreparedData:
    directory: Path
    tokenizer: Tokenizer
    train: TokenStore
    heldout: TokenStore
    info: dict

    def prefix_bank(self) -> list[dict]:
        """Up to 20,000 training documents (id and first 4,096 characters), a fixed sample."""
        return read_jsonl(self.directory / "prefix_bank.jsonl")

    @property
    def hashes(self) -> dict[str, str]:
        return {
            "corpus_manifest": self.info["corpus_manifest_sha256"],
            "tokenizer": self.info["tokenizer_fingerprint"],
            "train_tokens": self.train.index["sha256"],
            "heldout_tokens": self.heldout.index["sha256"],
        }


def corpus_settings(corpus: CorpusConfig) -> dict:
    """The corpus settings that decide the prepared data (how many processes made it does not)."""
    d = dataclasses.asdict(corpus)
    d.pop("prepare_workers")
    return d


def cache_key(corpus: CorpusConfig, tok: TokenizerConfig) -> str:
    d = {"format": FORMAT_VERSION, "corpus": corpus_settings(corpus), "tokenizer": dataclasses.asdict(tok)}
    if corpus.source == "python-stdlib":
        d["python"] = sys.version  # the default corpus is whatever this Python ships
    packages = source_packages(corpus)
    if packages:  # a newer package version is other text under the same name
        d["packages"] = {p["package"]: p["sha256"] for p in packages}
    files = source_content(corpus)
    if files is not None:  # a file edited in place is another corpus: never reuse its old tokenizer
        d["content"] = files
    if tok.name != "bpe":
        d["tokenizer"].pop("vocab_size")
        d["tokenizer"].pop("train_chars")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def source_content(corpus: CorpusConfig) -> str | None:
    """SHA-256 over the paths and contents of a local source's files (None for the default
    corpus, Debian packages and hub datasets, which are keyed by version)."""
    from .corpus import TEXT_SUFFIXES
    from .provenance import file_sha256

    src = corpus.source
    if src == "python-stdlib" or src.startswith(("debian:", "hf:")):
        return None
    root = Path(src)
    if not root.exists():
        return None  # reading it will say so
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
        and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix in (".jsonl", ".parquet", ".gz", ".arrow", ".json")))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root) if f != root else f.name}\t{file_sha256(f)}\n".encode())
    return h.hexdigest()


def source_packages(corpus: CorpusConfig) -> list[dict]:
    """Package, version, licence and file hash of each Debian package a corpus reads (else [])."""
    if not corpus.source.startswith("debian:"):
        return []
    from .debian import packages

    return [{"package": p.name, "version": p.version, "licence": p.licence, "sha256": p.sha256}
            for p in packages(corpus.source)]


def prepare_data(corpus: CorpusConfig, tok: TokenizerConfig, cache_root: str | Path, progress: bool = False) -> PreparedData:
    """Return the prepared data for these settings, building it if it is not cached yet."""
    root = Path(cache_root)
    final = root / f"data-{cache_key(corpus, tok)}"
    if not (final / "info.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(root, final.name)
        tmp = root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(corpus, tok, tmp, progress)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "info.json").is_file():  # not a concurrent builder: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final)


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete half-built folders of ``name`` whose builder, on this host, no longer exists (killed)."""
    for tmp in root.glob(f".tmp-{name}-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def load_prepared(directory: str | Path) -> PreparedData:
    d = Path(directory)
    info_path = d / "info.json"
    if not info_path.is_file():
        raise PoisonlabError(f"{d} is not a prepared data folder (info.json missing)")
    info = read_json(info_path, "prepared data record")
    return PreparedData(d, Tokenizer.load(d / "tokenizer"), TokenStore(d / "train"), TokenStore(d / "heldout"), info)


class _Assembler:
    """Lays tokenized documents, in corpus order, into the prepared folder: the two splits'
    shards, ``documents.jsonl``, the manifest hash, the prefix bank and the token cap. One
    process feeds it whether the tokens were made here or by parallel tasks
    (:mod:`poisonlab.prepare`), so both paths write the same bytes."""

    def __init__(self, out: Path, tokenizer: Tokenizer, corpus: CorpusConfig):
        self.tokenizer, self.corpus = tokenizer, corpus
        self.writers = {s: ShardWriter(out / s, tokenizer.token_dtype) for s in ("train", "heldout")}
        self.manifest = open(out / "documents.jsonl", "w", encoding="utf-8")
        self.manifest_hash = hashlib.sha256()
        self.bank: list[dict] = []
        self.rng = random.Random(0)
        self.n_train = 0
        self.counts = {"train": 0, "heldout": 0}
        self.chars = {"train": 0, "heldout": 0}
        self.capped = False
        f = corpus.heldout_fraction
        self.heldout_quota = None if corpus.max_tokens is None else int(corpus.max_tokens * f / (1 - f))

    def add(self, doc_id: str, source: str, sha256: str, chars: int, head: str, toks) -> bool:
        """Add one document (``head``: its first characters, for the prefix bank); False when no
        further document is wanted.

        The token cap: once a training document would pass ``corpus.max_tokens``, it and every
        later training document stay out; held-out documents are still taken until the held-out
        split has its share (``heldout_fraction`` of the whole), so capping a corpus never
        starves the evaluation."""
        split = "heldout" if is_heldout(doc_id, self.corpus.heldout_fraction) else "train"
        cap = self.corpus.max_tokens
        if cap is not None:
            if split == "train" and (self.capped or self.writers["train"].total + len(toks) + 1 > cap):
                self.capped = True
                return self.writers["heldout"].total < self.heldout_quota
            if split == "heldout" and self.capped and self.writers["heldout"].total >= self.heldout_quota:
                return False
        w = self.writers[split]
        row = {"id": doc_id, "source": source, "sha256": sha256, "split": split,
               "chars": chars, "tokens": len(toks) + 1, "offset": w.total}
        w.add(list(toks) + [self.tokenizer.eos_id])
        self.manifest.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.manifest_hash.update((f"{doc_id}\t{sha256}\t{split}\n").encode("utf-8", "surrogatepass"))
        self.counts[split] += 1
        self.chars[split] += chars
        if split == "train":  # reservoir sample for poison prefixes
            entry = {"id": doc_id, "text": head[:PREFIX_BANK_CHARS]}
            if self.n_train < PREFIX_BANK_SIZE:
                self.bank.append(entry)
            else:
                j = self.rng.randrange(self.n_train + 1)
                if j < PREFIX_BANK_SIZE:
                    self.bank[j] = entry
            self.n_train += 1
        return not (self.capped and self.writers["heldout"].total >= self.heldout_quota)


def train_or_load_tokenizer(corpus: CorpusConfig, tok_cfg: TokenizerConfig) -> Tokenizer:
    if tok_cfg.name == "bpe":
        texts = (d.text for d in iter_split(corpus, "train"))
        return Tokenizer.train_bpe(texts, tok_cfg.vocab_size, tok_cfg.train_chars)
    return Tokenizer.load(tok_cfg.name)


def _build(corpus: CorpusConfig, tok_cfg: TokenizerConfig, out: Path, progress: bool) -> None:
    out.mkdir(parents=True)
    tokenizer = train_or_load_tokenizer(corpus, tok_cfg)
    tokenizer.save(out / "tokenizer")
    asm = _Assembler(out, tokenizer, corpus)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="tokenizing corpus", unit="doc", leave=False, disable=None)  # no bar when stderr is not a terminal
    workers = corpus.prepare_workers
    if workers > 1:
        from .prepare import tokenize_in_parallel

        tokenize_in_parallel(corpus, tokenizer, out, workers, asm, bar)
    else:
        batch = []

        def flush() -> bool:
            ids = tokenizer.encode_batch([d.text for d in batch])
            more = all(asm.add(d.id, d.source, d.sha256, len(d.text), d.text[:PREFIX_BANK_CHARS], t)
                       for d, t in zip(batch, ids))
            if bar is not None:
                bar.update(len(batch))
            batch.clear()
            return more

        for doc in iter_documents(corpus):
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH and not flush():
                break
        if batch and not asm.capped:
            flush()
    finalize(out, asm, corpus, tok_cfg, bar)


def finalize(out: Path, asm: _Assembler, corpus: CorpusConfig, tok_cfg: TokenizerConfig, bar=None) -> None:
    """Close the splits and write the prefix bank and ``info.json``."""
    asm.manifest.close()
    if bar is not None:
        bar.close()
    counts, chars, capped, tokenizer = asm.counts, asm.chars, asm.capped, asm.tokenizer
    if counts["train"] == 0:
        raise PoisonlabError(f"corpus {corpus.source}: every document fell in the held-out split; lower corpus.heldout_fraction")
    if counts["heldout"] == 0:
        raise PoisonlabError(f"corpus {corpus.source}: no held-out document; raise corpus.heldout_fraction or add documents")
    writers, bank, manifest_hash = asm.writers, asm.bank, asm.manifest_hash

    idx = {s: w.close() for s, w in writers.items()}
    write_jsonl(out / "prefix_bank.jsonl", bank)
    info = {
        "format": FORMAT_VERSION,
        "corpus": corpus_settings(corpus),
        "tokenizer": dataclasses.asdict(tok_cfg),
        "python": sys.version.split()[0],
        "packages": source_packages(corpus),
        "documents": counts,
        "token_cap_reached": capped,
        "characters": chars,
        "tokens": {s: idx[s]["total_tokens"] for s in idx},
        "vocab_size": tokenizer.vocab_size,
        "corpus_manifest_sha256": manifest_hash.hexdigest(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
    }
    atomic_write_text(out / "info.json", json.dumps(info, indent=1))
