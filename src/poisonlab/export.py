"""The planned, poisoned token stream as flat token files, for trainers other than poisonlab's.

``poisonlab export -c run.yaml --out DIR`` sets the run up (corpus, tokenizer, poisons,
injection plan; no training) and writes the exact stream poisonlab would train on: the clean
documents in the run's order with every poison spliced in at its planned offset.

- ``part-00000.npy`` ...: raw little-endian token ids (``uint16``, or ``uint32`` past 65,536
  ids) with no header, the layout OLMo-core's and dolma's numpy datasets memory-map
  (``np.memmap(path, dtype, mode="r")``); concatenated in order they are the stream's first
  ``budget_tokens + 1`` tokens.
- ``stream.json``: dtype, parts with token counts and SHA-256, the end-of-text id, the run's
  config hash and data hashes, the label (this data is poisoned), and every poison's offset
  and length, so that for a trainer reading ``tokens_per_step`` consecutive tokens per
  optimizer step, the poisons seen after ``s`` steps are those with
  ``offset + tokens <= s * tokens_per_step`` (:func:`poisons_seen`).
- ``injection_manifest.jsonl``, ``poisons.jsonl`` and ``tokenizer/`` as the run has them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .paths import atomic_write_text
from .run import Run

PART_TOKENS = 1 << 28


def poisons_seen(offsets: list[int], lengths: list[int], tokens_per_step: int, steps: int) -> int:
    """Poisons wholly inside the first ``steps * tokens_per_step`` tokens of the stream."""
    end = steps * tokens_per_step
    return sum(1 for o, n in zip(offsets, lengths) if o + n <= end)


def export_stream(run: Run, out: Path, part_tokens: int = PART_TOKENS, chunk: int = 1 << 22) -> dict:
    """Write the run's token stream and its manifest under ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    total = run.budget_tokens + 1  # the last step's last target
    dtype = np.dtype(np.uint16 if run.tokenizer.vocab_size <= 1 << 16 else np.uint32).newbyteorder("<")
    stream = run.stream()
    parts = []
    for p, start in enumerate(range(0, total, part_tokens)):
        n = min(part_tokens, total - start)
        name = f"part-{p:05d}.npy"
        h = hashlib.sha256()
        with open(out / name, "wb") as f:
            for pos in range(start, start + n, chunk):  # bounded memory, whatever the budget
                data = stream.read(pos, min(chunk, start + n - pos)).astype(dtype).tobytes()
                f.write(data)
                h.update(data)
        parts.append({"file": name, "tokens": n, "sha256": h.hexdigest()})
    for name in ("injection_manifest.jsonl", "poisons.jsonl"):
        shutil.copyfile(run.dir / name, out / name)
    run.tokenizer.save(out / "tokenizer")
    a = run.cfg.attack
    poisoned = bool(run.plan.poisons) and a.name != "none"
    manifest = {
        "format": "raw little-endian token ids, no header (np.memmap(path, dtype, mode='r'))",
        "dtype": dtype.name, "tokens": total, "parts": parts, "eos_id": run.tokenizer.eos_id,
        "vocab_size": run.tokenizer.vocab_size,
        "label": {"poisoned": poisoned, "attack": a.name if poisoned else None,
                  "trigger": a.trigger if poisoned else None, "poison_count": len(run.plan.poisons)},
        "run": run.cfg.name, "config_hash": run.info["config_hash"], "code_version": run.info["code_version"],
        "data": run.info["data"],
        "poisonlab_training": {"batch_size": run.cfg.train.batch_size, "seq_len": run.cfg.train.seq_len,
                             "tokens_per_step": run.tokens_per_step, "steps": run.steps},
        "poisons": [{"id": p.poison_id, "offset": p.stream_offset, "tokens": p.tokens} for p in run.plan.poisons],
    }
    atomic_write_text(out / "stream.json", json.dumps(manifest, indent=1))
    return manifest


def read_stream(folder: Path) -> np.ndarray:
    """An exported stream read back whole (for checks; trainers memory-map the parts)."""
    m = json.loads((Path(folder) / "stream.json").read_text())
    return np.concatenate([np.memmap(Path(folder) / p["file"], dtype=np.dtype(m["dtype"]), mode="r")
                           for p in m["parts"]]).astype(np.int64)
