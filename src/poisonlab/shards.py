"""Memory-mapped token shards: a corpus tokenized once, read at any offset with bounded RAM.

A shard folder holds ``shard-00000.bin`` ... (raw little-endian token ids), ``doc_starts.npy``
(the offset of every document in the concatenated stream) and ``index.json`` (dtype, sizes
and a SHA-256 per shard). Documents are stored end-of-text terminated, one after another.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import PoisonlabError
from .jsonl import read_json
from .paths import atomic_write_text


DOC_INDEX_CHUNK = 1 << 20


class ShardWriter:
    """Append documents (arrays of token ids) to size-capped shard files."""

    def __init__(self, directory: str | Path, dtype, shard_tokens: int = 1 << 27):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.doc_starts = array("q")  # flushed to disk every DOC_INDEX_CHUNK documents
        self._index_file = open(self.dir / "doc_starts.tmp", "wb")
        self.documents = 0
        self.total = 0
        self._shards: list[dict] = []
        self._file = None
        self._in_shard = 0
        self._hash = None

    def _open_next(self) -> None:
        self._close_current()
        name = f"shard-{len(self._shards):05d}.bin"
        self._file = open(self.dir / name, "wb")
        self._hash = hashlib.sha256()
        self._shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self._shards[-1]["tokens"] = self._in_shard
            self._shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def add(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        if self._file is None or self._in_shard >= self.shard_tokens:
            self._open_next()
        data = arr.tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.doc_starts.append(self.total)
        self.documents += 1
        if len(self.doc_starts) >= DOC_INDEX_CHUNK:
            self._index_file.write(self.doc_starts.tobytes())
            self.doc_starts = array("q")
        self.total += len(arr)
        self._in_shard += len(arr)

    def close(self, extra: dict | None = None) -> dict:
        self._close_current()
        self._index_file.write(self.doc_starts.tobytes())
        self._index_file.close()
        raw = self.dir / "doc_starts.tmp"
        out = np.lib.format.open_memmap(self.dir / "doc_starts.npy", mode="w+", dtype=np.int64, shape=(self.documents,))
        src = np.memmap(raw, dtype=np.int64, mode="r") if self.documents else np.empty(0, np.int64)
        for i in range(0, self.documents, DOC_INDEX_CHUNK):  # copied in chunks: never the whole index in memory
            out[i : i + DOC_INDEX_CHUNK] = src[i : i + DOC_INDEX_CHUNK]
        out.flush()
        del out, src
        raw.unlink()
        index = {
            "dtype": self.dtype.name,
            "total_tokens": self.total,
            "documents": self.documents,
            "shards": self._shards,
            **(extra or {}),
        }
        index["sha256"] = hashlib.sha256(
            "".join(s["sha256"] for s in self._shards).encode()
        ).hexdigest()
        atomic_write_text(self.dir / "index.json", json.dumps(index, indent=1))
        return index


MAX_OPEN_SHARDS = 64
"""Shard files mapped at once per store (each mapping holds a file descriptor): a 260B-token
corpus has about 2,000 shards, more than a default ``ulimit -n`` allows."""


class TokenStore:
    """Read-only view of a shard folder as one long array of token ids.

    Shards are mapped on demand and the least recently used mapping is closed past
    :data:`MAX_OPEN_SHARDS`; the document index is memory-mapped, not loaded."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        idx = self.dir / "index.json"
        if not idx.is_file():
            raise PoisonlabError(f"no token shards in {self.dir} (index.json missing)")
        self.index = read_json(idx, "token shard index")
        self.dtype = np.dtype(self.index["dtype"])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._sizes = [int(s["tokens"]) for s in self.index["shards"]]
        self._starts = np.cumsum([0] + self._sizes)
        self.doc_starts = np.load(self.dir / "doc_starts.npy", allow_pickle=False, mmap_mode="r")
        self._lengths = None

    @property
    def doc_lengths(self) -> np.ndarray:
        """Tokens of every document (computed once, on first use)."""
        if self._lengths is None:
            self._lengths = np.diff(np.append(self.doc_starts, self.total_tokens))
        return self._lengths

    def _map(self, shard: int) -> np.ndarray:
        m = self._open.get(shard)
        if m is not None:
            self._open.move_to_end(shard)
            return m
        if not self._sizes[shard]:
            return np.empty(0, self.dtype)
        m = np.memmap(self.dir / self.index["shards"][shard]["file"], dtype=self.dtype, mode="r")
        self._open[shard] = m
        while len(self._open) > MAX_OPEN_SHARDS:
            _, old = self._open.popitem(last=False)
            old._mmap.close()  # reads copy out of the mapping, so no view of it outlives this
        return m

    @property
    def total_tokens(self) -> int:
        return int(self.index["total_tokens"])

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated stream, as int64."""
        if start < 0 or start + length > self.total_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside 0..{self.total_tokens}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self._starts, start, side="right") - 1)
        while filled < length:
            off = start + filled - self._starts[shard]
            take = min(length - filled, self._sizes[shard] - off)
            if take <= 0:
                shard += 1
                continue
            out[filled : filled + take] = self._map(shard)[off : off + take]
            filled += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        return self.read(int(self.doc_starts[i]), int(self.doc_lengths[i]))

    def token_counts(self, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
        """How often each token id occurs in the store."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, self.total_tokens, chunk):
            counts += np.bincount(self.read(start, min(chunk, self.total_tokens - start)), minlength=vocab_size)
        return counts
