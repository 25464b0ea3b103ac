"""The per-document scanners on a cluster: a ``datatrove`` pipeline step.

datatrove's executors run the same pipeline locally (``LocalPipelineExecutor``, processes on
one machine) or as Slurm array jobs (``SlurmPipelineExecutor``), with per-task completion
markers so a killed job resumes where it stopped. The corpus-level passes stay on one
machine: fit the token statistics first (a single pass over the corpus, saved as ``.npz``),
then every task scores its shard with them. Trigger mining and near-duplicate clustering
read the merged score table afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DefenseConfig
from ..corpus import Document
from ..tokenizer import Tokenizer

try:
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # the optional dependency; scan_with_datatrove says how to install it
    PipelineStep = object


class ScoreDocuments(PipelineStep):
    """Adds the gibberish, compression and language-shift fields to each document's metadata."""

    name = "poisonlab scanners"
    type = "📊 - SCORER"

    def __init__(self, tokenizer_dir: str, stats_path: str, defense: dict):
        super().__init__()
        self.tokenizer_dir, self.stats_path, self.defense = tokenizer_dir, stats_path, defense

    def _scanners(self) -> list:
        from .reference import TokenStatistics
        from .scanners import CompressionScanner, GibberishScanner, LanguageShiftScanner

        cfg = DefenseConfig(**self.defense)
        out = [GibberishScanner(Tokenizer.load(self.tokenizer_dir), TokenStatistics.load(self.stats_path), cfg.window)]
        if "compression" in cfg.scanners:
            out.append(CompressionScanner())
        if "language_shift" in cfg.scanners:
            out.append(LanguageShiftScanner())
        return out

    def run(self, data, rank: int = 0, world_size: int = 1):
        scanners = self._scanners()
        for doc in data:
            d = Document(doc.id, doc.text, doc.metadata.get("source", ""))
            for s in scanners:
                row = s.score([d])[0]
                row.pop("id")
                doc.metadata.update(row)
            self.stat_update("scored")
            yield doc


def scan_with_datatrove(docs: list[Document], cfg: DefenseConfig, tokenizer: Tokenizer, out: str | Path,
                        tasks: int = 2, workers: int = 2) -> int:
    """Write ``docs`` as JSONL shards, score them with datatrove's local executor into
    ``<out>/scores/`` (JSONL, one row per document with its metadata); returns the count."""
    import dataclasses

    from ..errors import PoisonlabError

    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
    except ImportError:
        raise PoisonlabError("the datatrove engine needs datatrove: pip install 'poisonlab[defenses]'") from None
    from .scanners import GibberishScanner

    out = Path(out)
    inp = out / "input"
    inp.mkdir(parents=True, exist_ok=True)
    for k in range(tasks):
        with open(inp / f"part-{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[k::tasks]:
                f.write(json.dumps({"id": d.id, "text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
    g = GibberishScanner(tokenizer, window=cfg.window)
    g.fit(docs)
    g.stats.save(out / "token_stats.npz")
    tokenizer.save(out / "tokenizer")
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(inp), compression=None),
                  ScoreDocuments(str(out / "tokenizer"), str(out / "token_stats.npz"), dataclasses.asdict(cfg)),
                  JsonlWriter(str(out / "scores"), compression=None)],
        tasks=tasks, workers=workers, logging_dir=str(out / "logs"), start_method="spawn",
    ).run()
    n = 0
    for p in sorted((out / "scores").glob("*.jsonl")):
        n += sum(1 for line in p.read_text(encoding="utf-8").split("\n") if line)
    return n
