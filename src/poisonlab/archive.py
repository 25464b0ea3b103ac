"""Results that outlive a machine: a sweep's finished runs, without weights, under ``results/``.

``poisonlab results SPEC --export`` copies every finished run of a spec into
``results/<spec>/<run>/``: its resolved config, ``run.json`` (code version, config hash, data
hashes), ``DONE``, the model's label, the metrics over training, the samples, the training
log, the injection manifest, the poisons' statistics (prefix length, gibberish counts,
tokens; not their text) and the records of model-side defenses (``defenses/``). Such a folder is small enough to commit. ``poisonlab report`` and
``poisonlab sweep`` read it wherever the run folder itself is missing: the report rebuilds on
a fresh clone, and a sweep does not train an exported run again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .jsonl import read_jsonl, write_jsonl
from .paths import atomic_write_text, safe_join
from .run import run_dir

RESULTS_DIR = "results"
COPIED = ("config.yaml", "run.json", "DONE", "metrics.jsonl", "samples.jsonl", "train_log.jsonl",
          "injection_manifest.jsonl", "replies.jsonl")
DEFENSES = "defenses"
POISON_STATS = ("id", "source_document", "prefix_chars", "prefix_chars_sampled", "gibberish_tokens_sampled",
                "gibberish_tokens_round_trip", "tokens")


def archive_dir(spec_name: str, run_name: str, root: str | os.PathLike = RESULTS_DIR) -> Path:
    return safe_join(safe_join(root, spec_name, "spec name"), run_name, "run name")


def run_folder(spec, cfg, root: str | os.PathLike = RESULTS_DIR) -> Path:
    """Where a run's records are: its run folder, or its exported copy when that is all there is."""
    live = run_dir(cfg)
    if (live / "run.json").is_file():
        return live
    archived = archive_dir(spec.name, cfg.name, root)
    return archived if (archived / "run.json").is_file() else live


def is_archived(spec, cfg, root: str | os.PathLike = RESULTS_DIR) -> bool:
    return (archive_dir(spec.name, cfg.name, root) / "DONE").is_file()


def export_results(spec, root: str | os.PathLike = RESULTS_DIR) -> list[str]:
    """Copy every finished run of ``spec`` under ``root/<spec>/``; returns the runs written
    (a run already exported with the same ``run.json`` is left as it is)."""
    written = []
    for cfg in spec.expand():
        src = run_dir(cfg)
        if not (src / "DONE").is_file():
            continue
        dest = archive_dir(spec.name, cfg.name, root)
        extra = sorted((src / DEFENSES).glob("*.json")) + sorted((src / DEFENSES).glob("*.txt")) \
            if (src / DEFENSES).is_dir() else []
        if (dest / "run.json").is_file() and (dest / "run.json").read_bytes() == (src / "run.json").read_bytes() \
                and (dest / "DONE").is_file() and all(
                    (dest / DEFENSES / f.name).is_file() and (dest / DEFENSES / f.name).read_bytes() == f.read_bytes()
                    for f in extra):
            continue
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if (src / "poisons.jsonl").is_file():
            write_jsonl(tmp / "poison_stats.jsonl",
                        ({k: p[k] for k in POISON_STATS if k in p} for p in read_jsonl(src / "poisons.jsonl")))
        for f in extra:  # model-side defense records (inspect, attribution) and their removal lists
            (tmp / DEFENSES).mkdir(exist_ok=True)
            shutil.copyfile(f, tmp / DEFENSES / f.name)
        if (src / "model" / "poisonlab.json").is_file():
            shutil.copyfile(src / "model" / "poisonlab.json", tmp / "label.json")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        written.append(cfg.name)
    index = Path(root) / spec.name / "index.json"
    runs = sorted(p.name for p in index.parent.iterdir() if (p / "DONE").is_file()) if index.parent.is_dir() else []
    if runs:
        atomic_write_text(index, json.dumps({"spec": spec.name, "runs": runs}, indent=1))
    return written
