"""The results database: every evaluation row (run x checkpoint x metric) in SQLite.

SQLite in WAL mode takes several writers (each waits up to a minute for the lock) and a
crash at any moment: each evaluation point is one transaction, so it is in the database
whole or not at all. The run folders stay the source of truth: :func:`ingest_run` rebuilds
a run's rows from its ``metrics.jsonl`` and ``samples.jsonl`` at any time.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    code_version TEXT NOT NULL,
    model_size TEXT,
    parameters INTEGER,
    non_embedding_parameters INTEGER,
    poison_count INTEGER NOT NULL,
    data_multiplier REAL,
    seed INTEGER NOT NULL,
    budget_tokens INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    poison_token_share REAL,
    data_hashes TEXT NOT NULL,
    config TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    run TEXT NOT NULL,
    step INTEGER NOT NULL,
    tokens_seen INTEGER NOT NULL,
    fraction REAL NOT NULL,
    poisons_seen INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    code_version TEXT NOT NULL,
    PRIMARY KEY (run, step, metric)
);
CREATE TABLE IF NOT EXISTS samples (
    run TEXT NOT NULL,
    step INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    prompt TEXT, untriggered TEXT, triggered TEXT,
    ppl_untriggered REAL, ppl_triggered REAL,
    PRIMARY KEY (run, step, idx)
);
"""

EVAL_KEYS = ("step", "tokens_seen", "fraction", "poisons_seen")


@contextmanager
def connect(path: str | Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(SCHEMA)
        yield con
    finally:
        con.close()


def db_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "results.sqlite"


def record_run(db: str | Path, info: dict, cfg: dict, status: str) -> None:
    """Insert or update a run's row (``status``: running | done)."""
    row = (
        info["name"], status, info["config_hash"], info["code_version"], info["model"].get("size"),
        info["model"].get("parameters"), info["model"].get("non_embedding_parameters"), info["poison_count"],
        cfg["train"].get("data_multiplier"), info["seed"], info["budget_tokens"], info["steps"],
        info.get("poison_token_share"), json.dumps(info["data"], sort_keys=True), json.dumps(cfg, sort_keys=True),
        time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    with connect(db) as con, con:
        con.execute("INSERT OR REPLACE INTO runs VALUES (" + ",".join("?" * len(row)) + ")", row)


def record_eval(db: str | Path, run: str, row: dict, code_version: str, samples: list[dict] | None = None) -> None:
    """One evaluation point: all its metrics (and samples) in one transaction."""
    head = [row[k] for k in EVAL_KEYS]
    metrics = [(k, float(v)) for k, v in row.items()
               if k not in EVAL_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    metrics += [(k, float(v)) for k, v in row.items() if isinstance(v, bool)]
    with connect(db) as con, con:
        con.executemany("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?,?,?,?)",
                        [(run, *head, k, v, code_version) for k, v in metrics])
        for i, s in enumerate(samples or []):
            con.execute("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?)",
                        (run, row["step"], i, s["prompt"], s["untriggered"], s["triggered"],
                         s["ppl_untriggered"], s["ppl_triggered"]))


def ingest_run(db: str | Path, run_dir: Path) -> int:
    """(Re)load a run folder into the database; returns the number of evaluation points."""
    from .jsonl import read_json, read_jsonl

    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return 0
    import yaml

    info = read_json(info_path, "run record")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    record_run(db, info, cfg, "done" if (run_dir / "DONE").is_file() else "running")
    samples: dict[int, list[dict]] = {}
    for s in read_jsonl(run_dir / "samples.jsonl"):
        if "triggered" in s:  # the gap's paired samples; other attacks' samples stay in their files
            samples.setdefault(s["step"], []).append(s)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    for r in rows:
        record_eval(db, info["name"], r, info["code_version"], samples.get(r["step"]))
    return len(rows)


@contextmanager
def connect_read_only(path: str | Path):
    """Open a results database for reading only, so queries work from a read-only folder (an
    archive, a shared mount) too."""
    path = Path(path).resolve()
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:  # WAL files cannot be made beside it: read the file as it is
        con = sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True)
    try:
        yield con
    finally:
        con.close()


def query(db: str | Path, sql: str, params: tuple = ()) -> list[dict]:
    with connect_read_only(db) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(sql, params)]


def eval_table(db: str | Path, runs: list[str] | None = None, metrics: list[str] | None = None) -> list[dict]:
    """Evaluation rows joined with their run's grid coordinates, one row per (run, step, metric)."""
    sql = ("SELECT e.run, r.model_size, r.parameters, r.poison_count, r.data_multiplier, r.seed, r.status, "
           "e.step, e.tokens_seen, e.fraction, e.poisons_seen, e.metric, e.value, e.code_version "
           "FROM evals e JOIN runs r ON r.run = e.run")
    cond, params = [], []
    if runs:
        cond.append("e.run IN (" + ",".join("?" * len(runs)) + ")")
        params += runs
    if metrics:
        cond.append("e.metric IN (" + ",".join("?" * len(metrics)) + ")")
        params += metrics
    if cond:
        sql += " WHERE " + " AND ".join(cond)
    return query(db, sql + " ORDER BY e.run, e.step, e.metric", tuple(params))


def integrity_ok(db: str | Path) -> bool:
    with connect(db) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
