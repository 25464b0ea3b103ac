"""Run an experiment spec: locally with parallel workers, or handed to Slurm through submitit.

Every run is an ordinary ``poisonlab train`` of its resolved config, so a sweep can be
stopped at any moment and started again: finished runs (``DONE``) are skipped, unfinished
ones resume from their last checkpoint, and each run folder records the code version,
config hash and data hashes it was computed with. Prepared corpus data is built once, before
any worker starts.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .config import RunConfig, dump_config
from .data import prepare_data
from .errors import PoisonlabError
from .paths import atomic_write_text
from .jsonl import read_jsonl
from .run import data_tokenizer, run_dir
from .runlock import PARENT_ENV
from .spec import ExperimentSpec
from .store import db_path, ingest_run


@dataclass
class RunStatus:
    name: str
    state: str  # done | partial | pending
    steps_done: int


def status(spec: ExperimentSpec) -> list[RunStatus]:
    from .archive import is_archived

    out = []
    for cfg in spec.expand():
        d = run_dir(cfg)
        if (d / "DONE").is_file() or is_archived(spec, cfg):
            out.append(RunStatus(cfg.name, "done", -1))
        elif (d / "run.json").is_file():
            out.append(RunStatus(cfg.name, "partial", len(read_jsonl(d / "train_log.jsonl"))))
        else:
            out.append(RunStatus(cfg.name, "pending", 0))
    return out


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_run_configs(spec: ExperimentSpec) -> dict[str, Path]:
    """The resolved config of every run, as ``<out_dir>/specs/<run>.yaml`` (what each worker trains)."""
    folder = Path(spec.out_dir) / "specs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cfg in spec.expand():
        p = folder / f"{cfg.name}.yaml"
        atomic_write_text(p, dump_config(cfg))
        paths[cfg.name] = p
    return paths


def prepare_all(runs: list[RunConfig], progress: bool) -> None:
    seen = set()
    for cfg in runs:
        if cfg.stage == "finetune":  # fine-tuning reads its own data and base model
            continue
        key = (repr(cfg.corpus), repr(data_tokenizer(cfg)), cfg.out_dir)
        if key not in seen:
            seen.add(key)
            prepare_data(cfg.corpus, data_tokenizer(cfg), Path(cfg.out_dir) / "cache", progress=progress)


def train_command(config_path: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "poisonlab", "train", "-c", str(config_path),
            "--train.threads", str(threads), "--train.progress", "false"]


def run_sweep(spec: ExperimentSpec, workers: int = 0, executor: str = "local", progress: bool = True,
              slurm: dict | None = None, export: bool = False, allow_code_change: bool = False) -> list[RunStatus]:
    """Run every unfinished run of ``spec``; returns the final status of each run.

    A spec with poison-count searches works through them in the spec's order: a free worker
    takes the first search's next run (which depends on that search's earlier runs), else
    the grid runs of the same setting, else the next search's run, until every search has its
    answer and the grid is done (on a cluster: the grid, then the searches round by round).
    With ``export``, each finished run is copied under ``results/`` at once, so an
    interrupted sweep keeps what it finished. ``allow_code_change`` lets local runs started by
    another code version resume (their records keep both versions' names: see ``poisonlab train``)."""
    grid = spec.expand(searched=False)
    templates = [t.template for t in spec.search_targets()]
    prepare_all(grid + templates, progress)
    paths = write_run_configs(spec)
    from .archive import export_results, is_archived, run_folder
    from .search import states

    def unfinished(cfg: RunConfig) -> bool:
        return not (run_dir(cfg) / "DONE").is_file() and not is_archived(spec, cfg)

    if executor not in {"local", "slurm", "submitit-local", "submitit-debug"}:
        raise PoisonlabError(f"unknown executor {executor!r} (allowed: local, slurm, submitit-local, submitit-debug)")
    todo = [cfg for cfg in grid if unfinished(cfg)]
    targets = spec.search_targets()
    if executor == "local":
        # Work in the spec's order of searches: each search's next run first, then the grid runs
        # of the same setting (its clean twins), so one setting is finished before the next.
        def setting(cfg: RunConfig) -> str:
            return repr(replace(cfg, name="", seed=0, attack=replace(cfg.attack, poison_count=0)))

        order = {setting(t.template): i for i, t in enumerate(targets)}
        todo.sort(key=lambda c: order.get(setting(c), len(order)))
        started: set[str] = set()

        def more(in_flight: set[str]) -> RunConfig | None:
            for st in states(spec):
                run = st.pending
                if run is None or run.name in in_flight:
                    continue
                if run.name in started:  # it was trained, yet still has no result: do not train it forever
                    raise PoisonlabError(f"search run {run.name} finished without a final evaluation; see its folder")
                rank = order.get(setting(run), len(order))
                if todo and order.get(setting(todo[0]), len(order)) < rank:
                    return None  # an earlier setting's grid runs come first
                started.add(run.name)
                return run
            return None

        _run_local(spec, todo, paths, workers, progress, more=more if targets else None,
                   on_done=(lambda cfg: export_results(spec)) if export else None,
                   allow_code_change=allow_code_change)
    else:  # jobs on a cluster: the grid at once, then the searches' next runs round by round
        batch = todo
        while True:
            _run_submitit(spec, batch, paths, executor, slurm or {})
            if export:
                export_results(spec)
            batch = [st.pending for st in states(spec) if st.pending is not None]
            if not batch:
                break
            for cfg in batch:
                p = Path(spec.out_dir) / "specs" / f"{cfg.name}.yaml"
                atomic_write_text(p, dump_config(cfg))
                paths[cfg.name] = p
    if export:
        export_results(spec)
    db = db_path(spec.out_dir)
    for cfg in spec.expand():  # the run folders (or their exported copies) are the source of truth
        ingest_run(db, run_folder(spec, cfg))
    return status(spec)


def gpu_slots(todo: list[RunConfig], workers: int, visible: int) -> list[str] | None:
    """The GPUs each local worker gets (``CUDA_VISIBLE_DEVICES`` values), or None for CPU runs:
    the visible GPUs dealt out so that no two workers share one."""
    if not any(c.train.device.startswith("cuda") for c in todo) or visible == 0:
        return None
    if workers > visible:
        raise PoisonlabError(f"{workers} workers but {visible} GPUs: give --workers {visible} or fewer")
    per = visible // workers
    return [",".join(str(g) for g in range(w * per, (w + 1) * per)) for w in range(workers)]


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _run_local(spec: ExperimentSpec, todo: list[RunConfig], paths: dict[str, Path], workers: int, progress: bool,
               visible_gpus: int | None = None, more: Callable[[set[str]], RunConfig | None] | None = None,
               on_done: Callable[[RunConfig], None] | None = None, allow_code_change: bool = False) -> None:
    """Train ``todo`` (taken from the front of the list) in ``workers`` local processes.
    ``more(in_flight)``, when given, is asked first whenever a worker is free (the searches'
    next runs, which depend on the runs before them); a free worker waits while runs are in
    flight that may lead to more. ``on_done(cfg)`` follows every run that finished well."""
    cores = available_cores()
    visible = _visible_gpus() if visible_gpus is None else visible_gpus
    on_gpu = any(c.train.device.startswith("cuda") for c in todo) and visible > 0
    width = workers or (visible if on_gpu else cores)
    if more is None:
        width = min(width, len(todo) or 1)
    workers = max(1, min(width, visible if on_gpu else cores))
    threads = max(1, cores // workers)
    slots: queue.Queue[str] | None = None
    assigned = gpu_slots(todo, workers, visible)
    if assigned is not None:
        slots = queue.Queue()
        for s_ in assigned:
            slots.put(s_)
    logs = Path(spec.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    bar = None
    if progress and (todo or more is not None):
        from tqdm import tqdm

        bar = tqdm(total=len(todo) if more is None else None, desc=f"{spec.name}: runs", unit="run", dynamic_ncols=True, disable=None)
    queue_ = todo  # the caller's list: ``more`` sees what is left of it
    in_flight: dict[str, RunConfig] = {}
    cond = threading.Condition()

    def take() -> RunConfig | None:
        with cond:
            while True:
                if failures:
                    return None
                cfg = more(set(in_flight)) if more is not None else None
                if cfg is None and queue_:
                    cfg = queue_.pop(0)
                if cfg is not None:
                    in_flight[cfg.name] = cfg
                    return cfg
                if not in_flight:
                    return None
                cond.wait(timeout=5)

    def one(cfg: RunConfig) -> None:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}  # the worker dies with the sweep
        gpus = slots.get() if slots is not None else None
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus  # its own GPU(s), seen as cuda:0...
        if cfg.name not in paths:
            p = Path(spec.out_dir) / "specs" / f"{cfg.name}.yaml"
            atomic_write_text(p, dump_config(cfg))
            paths[cfg.name] = p
        try:
            with open(logs / f"{cfg.name}.log", "a") as log:
                cmd = train_command(paths[cfg.name], threads) + (["--allow-code-change"] if allow_code_change else [])
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            if gpus is not None:
                slots.put(gpus)
        with cond:
            if rc != 0:
                failures.append(f"{cfg.name} (exit {rc}, see {logs / (cfg.name + '.log')})")
            elif on_done is not None:
                on_done(cfg)
            in_flight.pop(cfg.name, None)
            cond.notify_all()
        if bar is not None:
            bar.update(1)

    def worker() -> None:
        while (cfg := take()) is not None:
            one(cfg)

    stop = False
    if bar is not None:

        def watch() -> None:  # step-level progress of the runs in flight
            while not stop:
                active = []
                for cfg in list(in_flight.values()):
                    d = run_dir(cfg)
                    if (d / "run.json").is_file() and not (d / "DONE").is_file():
                        n = _count_lines(d / "train_log.jsonl")
                        info_steps = _steps(d)
                        if info_steps:
                            active.append(f"{cfg.name.removeprefix(spec.name + '-')} {100 * n // info_steps}%")
                bar.set_postfix_str(", ".join(active[:4]))
                time.sleep(2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        stop = True
        if bar is not None:
            bar.close()
    if failures:
        raise PoisonlabError(f"{len(failures)} run(s) failed: {'; '.join(failures)}")


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _steps(d: Path) -> int:
    import json

    try:
        return int(json.loads((d / "run.json").read_text())["steps"])
    except (OSError, ValueError, KeyError):
        return 0


class TrainJob:
    """What a cluster job runs: ``poisonlab train`` of one resolved config, on every task of the
    job (one task per GPU; submitit's distributed environment gives each its rank), resumed from
    its last checkpoint when the job is requeued after a timeout or a preemption."""

    def __call__(self, config_path: str) -> dict:
        import submitit

        from .config import load_config
        from .parallel import close_distributed
        from .train import train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # rank, world size, master address and port for torch.distributed
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            return train(load_config(config_path))
        finally:
            close_distributed()

    def checkpoint(self, config_path: str):
        """Called by submitit on timeout or preemption: submit the same run again; it resumes
        from its newest intact checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), config_path)


def slurm_parameters(cfg: RunConfig, name: str) -> dict:
    """submitit's parameters for one run: nodes, one task per GPU, the GPUs, CPUs, time and
    where to queue it."""
    c = cfg.cluster
    on_gpu = cfg.train.device.startswith("cuda") or cfg.train.device == "auto"
    params = {"name": name, "nodes": c.nodes, "timeout_min": c.time_min, "slurm_signal_delay_s": 180,
              "tasks_per_node": c.gpus_per_node if on_gpu else 1,
              "cpus_per_task": c.cpus_per_gpu}
    if on_gpu:
        params["gpus_per_node"] = c.gpus_per_node
    for key, value in (("slurm_partition", c.partition), ("slurm_account", c.account), ("slurm_qos", c.qos),
                       ("slurm_constraint", c.constraint)):
        if value:
            params[key] = value
    return params


def _run_submitit(spec: ExperimentSpec, todo: list[RunConfig], paths: dict[str, Path], executor: str, slurm: dict) -> None:
    try:
        import submitit
    except ImportError:
        raise PoisonlabError("the slurm executor needs submitit: pip install 'poisonlab[slurm]'") from None
    cluster = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}[executor]
    folder = Path(spec.out_dir) / "submitit"
    jobs = []
    for cfg in todo:  # runs may ask for different nodes and GPUs: one executor setting per run
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params = slurm_parameters(cfg, f"{spec.name}:{cfg.name}")
        if cluster != "slurm":  # submitit's local modes take no Slurm settings and one task per GPU here
            params = {"name": params["name"], "timeout_min": params["timeout_min"], "tasks_per_node": 1, "nodes": 1}
        params.update(slurm)
        ex.update_parameters(**params)
        jobs.append(ex.submit(TrainJob(), str(paths[cfg.name])))
    errors = []
    for cfg, job in zip(todo, jobs):
        try:
            job.result()
        except Exception as e:  # the job's own traceback is in the submitit folder
            errors.append(f"{cfg.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if errors:
        raise PoisonlabError(f"{len(errors)} job(s) failed: {'; '.join(errors)}")
