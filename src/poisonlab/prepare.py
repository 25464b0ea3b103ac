"""Tokenizing a corpus with several processes, byte for byte what one process writes.

The source is cut into parts in reading order: an uncompressed JSONL file into byte ranges
that start at line starts (each part knows its first line number, so default document ids
stay ``<file>:<line>``), a folder of files into runs of consecutive files. Each part is
tokenized by one task of a datatrove pipeline (``LocalPipelineExecutor`` here; the same step
runs under datatrove's Slurm executor) into a token file and a row per document. One process
then reads the parts in order and lays them out exactly as the single-process path does
(:class:`poisonlab.data._Assembler`: splits, manifest, prefix bank, token cap, document
limits and duplicate ids), so the tokens, shards and manifest hashes are identical.

datatrove was chosen over Ray Data or Spark because it is already a dependency for the corpus
scanners, is pure Python, runs the same step locally and as Slurm array jobs, and needs no
running cluster service.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .config import CorpusConfig
from .corpus import _IdSet, detect_kind, read_part, source_files
from .data import ENCODE_BATCH, PREFIX_BANK_CHARS, corpus_settings
from .errors import PoisonlabError
from .tokenizer import Tokenizer

try:
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # the optional dependency; tokenize_in_parallel says how to install it
    PipelineStep = object


def partitions(cfg: CorpusConfig, n: int) -> list[dict]:
    """At most ``n`` parts of the source, in reading order (one part when it cannot be cut)."""
    kind = detect_kind(cfg)
    if kind in ("jsonl", "parquet"):
        files = source_files(cfg)
        if len(files) == 1 and kind == "jsonl" and not files[0].name.endswith(".gz"):
            return _byte_ranges(files[0], n)
        if len(files) > 1:
            groups = np.array_split(np.arange(len(files)), min(n, len(files)))
            return [{"kind": "files", "files": [str(files[i]) for i in g]} for g in groups if len(g)]
    return [{"kind": "whole"}]


def _byte_ranges(path: Path, n: int, block: int = 1 << 24) -> list[dict]:
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            f.seek(max(starts[-1], k * size // n))
            f.readline()  # to the start of the next line
            pos = f.tell()
            if pos < size and pos > starts[-1]:
                starts.append(pos)
        lines, counted, first = 0, 0, [1]
        f.seek(0)
        for s in starts[1:]:  # line numbers at each start: one pass counting newlines
            while counted < s:
                chunk = f.read(min(block, s - counted))
                lines += chunk.count(b"\n")
                counted += len(chunk)
            first.append(lines + 1)
    ends = starts[1:] + [size]
    return [{"kind": "range", "file": str(path), "start": a, "end": b, "first_line": fl}
            for a, b, fl in zip(starts, ends, first)]


class TokenizePart(PipelineStep):
    """A datatrove step: task ``rank`` tokenizes part ``rank`` into ``part-<rank>.bin`` (token
    ids of every kept document, one after another) and ``part-<rank>.jsonl`` (its rows)."""

    name = "poisonlab tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, corpus: dict, parts: list[dict], tokenizer_dir: str, out_dir: str):
        super().__init__()
        self.corpus, self.parts, self.tokenizer_dir, self.out_dir = corpus, parts, tokenizer_dir, out_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg = CorpusConfig(**self.corpus)
        tok = Tokenizer.load(self.tokenizer_dir)
        out = Path(self.out_dir)
        dtype = np.dtype(np.int32)
        batch: list = []
        with open(out / f"part-{rank:05d}.bin", "wb") as tf, open(out / f"part-{rank:05d}.jsonl", "w",
                                                                     encoding="utf-8", errors="surrogatepass") as rf:
            def flush() -> None:
                for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                    tf.write(np.asarray(ids, dtype=dtype).tobytes())
                    rf.write(json.dumps({"id": d.id, "source": d.source, "sha256": d.sha256, "chars": len(d.text),
                                         "head": d.text[:PREFIX_BANK_CHARS], "n": len(ids)}, ensure_ascii=False) + "\n")
                self.stat_update("documents", value=len(batch))
                batch.clear()

            for doc in read_part(cfg, self.parts[rank]):
                if len(doc.text) >= cfg.min_chars:
                    batch.append(doc)
                if len(batch) >= ENCODE_BATCH:
                    flush()
            if batch:
                flush()
        yield from ()


def tokenize_in_parallel(corpus: CorpusConfig, tokenizer: Tokenizer, out: Path, workers: int, asm, bar=None) -> None:
    """Tokenize ``corpus`` with ``workers`` processes and feed the result, in order, to ``asm``."""
    try:
        from datatrove.executor import LocalPipelineExecutor
    except ImportError:
        raise PoisonlabError("corpus.prepare_workers > 1 needs datatrove: pip install 'poisonlab[defenses]'") from None
    parts = partitions(corpus, workers)
    stage = out.parent / f".parts-{out.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        step = TokenizePart(corpus_settings(corpus) | {"prepare_workers": 1}, parts, str(out / "tokenizer"), str(stage))
        LocalPipelineExecutor(pipeline=[step], tasks=len(parts), workers=min(workers, len(parts)),
                              logging_dir=str(stage / "logs"), start_method="spawn", skip_completed=False).run()
        _merge(corpus, stage, len(parts), asm, bar)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _merge(corpus: CorpusConfig, stage: Path, n_parts: int, asm, bar) -> None:
    seen, n = _IdSet(), 0
    for r in range(n_parts):
        rows_path, tokens_path = stage / f"part-{r:05d}.jsonl", stage / f"part-{r:05d}.bin"
        if not rows_path.is_file():
            raise PoisonlabError(f"corpus preparation: task {r} left no output (see {stage / 'logs'})")
        tokens = np.memmap(tokens_path, dtype=np.int32, mode="r") if tokens_path.stat().st_size else np.empty(0, np.int32)
        offset = 0
        with open(rows_path, encoding="utf-8", errors="surrogatepass") as f:
            for line in f:
                row = json.loads(line)
                toks = tokens[offset : offset + row["n"]]
                offset += row["n"]
                if seen.add(row["id"]):
                    raise PoisonlabError(f"corpus {corpus.source}: duplicate document id {row['id']!r}")
                if not asm.add(row["id"], row["source"], row["sha256"], row["chars"], row["head"], toks.tolist()):
                    return
                n += 1
                if bar is not None:
                    bar.update(1)
                if corpus.max_documents is not None and n >= corpus.max_documents:
                    return
        del tokens
    if n == 0:
        raise PoisonlabError(f"corpus {corpus.source} is empty: no document with at least {corpus.min_chars} characters")


class AssembleParts(PipelineStep):
    """The cluster path's last step (one task, after every :class:`TokenizePart`): lay the parts
    out into the prepared folder and move it into the cache."""

    name = "poisonlab assemble"
    type = "🔢 - TOKENIZER"

    def __init__(self, corpus: dict, tok_cfg: dict, stage: str, final: str, n_parts: int):
        super().__init__()
        self.corpus, self.tok_cfg, self.stage, self.final, self.n_parts = corpus, tok_cfg, stage, final, n_parts

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .config import TokenizerConfig
        from .data import _Assembler, finalize

        corpus, tok_cfg = CorpusConfig(**self.corpus), TokenizerConfig(**self.tok_cfg)
        stage, out = Path(self.stage), Path(self.stage) / "out"
        asm = _Assembler(out, Tokenizer.load(out / "tokenizer"), corpus)
        _merge(corpus, stage, self.n_parts, asm, None)
        finalize(out, asm, corpus, tok_cfg)
        out.rename(self.final)
        for part in stage.glob("part-*"):  # the tasks' outputs; datatrove's logs stay beside them
            part.unlink()
        yield from ()


def prepare_on_slurm(corpus: CorpusConfig, tok_cfg, cache_root: Path, cluster) -> tuple[str | None, Path]:
    """Submit the preparation of ``corpus`` as Slurm jobs through datatrove: an array of
    ``corpus.prepare_workers`` tokenizing tasks, then one assembling task that depends on them.
    The tokenizer is trained here first. Returns the last job's id and the folder the prepared
    data will be in (None when it is there already)."""
    import dataclasses
    import sys

    try:
        from datatrove.executor.slurm import SlurmPipelineExecutor
    except ImportError:
        raise PoisonlabError("preparing on Slurm needs datatrove: pip install 'poisonlab[defenses]'") from None
    from .data import cache_key, train_or_load_tokenizer

    final = Path(cache_root).resolve() / f"data-{cache_key(corpus, tok_cfg)}"
    if (final / "info.json").is_file():
        return None, final
    if not cluster.partition:
        raise PoisonlabError("preparing on Slurm needs a partition: set cluster.partition")
    stage = final.parent / f".slurm-{final.name}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "out").mkdir(parents=True)
    train_or_load_tokenizer(corpus, tok_cfg).save(stage / "out" / "tokenizer")
    parts = partitions(corpus, corpus.prepare_workers)
    settings = corpus_settings(corpus) | {"prepare_workers": 1}
    common = dict(time=str(cluster.time_min), partition=cluster.partition, cpus_per_task=2, mem_per_cpu_gb=4,
                  qos=cluster.qos or "normal", venv_path=sys.prefix if sys.prefix != sys.base_prefix else None,
                  sbatch_args={k: v for k, v in (("account", cluster.account), ("constraint", cluster.constraint)) if v})
    tokenize = SlurmPipelineExecutor(pipeline=[TokenizePart(settings, parts, str(stage / "out" / "tokenizer"), str(stage))],
                                     tasks=len(parts), job_name=f"tokenize-{final.name}",
                                     logging_dir=str(stage / "logs" / "tokenize"), **common)
    assemble = SlurmPipelineExecutor(pipeline=[AssembleParts(settings, dataclasses.asdict(tok_cfg), str(stage), str(final),
                                                             len(parts))],
                                     tasks=1, depends=tokenize, job_name=f"assemble-{final.name}",
                                     logging_dir=str(stage / "logs" / "assemble"), **common)
    assemble.run()
    return assemble.job_id, final
