"""Cluster hand-off: the Slurm job asks for what the spec says, requeues itself, and local
workers get GPUs of their own."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from poisonlab.config import config_from_dict, dump_config
from poisonlab.errors import PoisonlabError
from poisonlab.sweep import TrainJob, gpu_slots, slurm_parameters

from conftest import tiny_config

submitit = pytest.importorskip("submitit")


def test_sbatch_script_requests_what_was_asked_and_launches_every_task(tmp_path, monkeypatch):
    import submitit.slurm.slurm as slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # no Slurm here: write, don't submit
    cfg = config_from_dict({"train": {"device": "cuda"}, "cluster": {
        "nodes": 2, "gpus_per_node": 8, "partition": "gpu", "account": "lab", "constraint": "h100", "time_min": 720}})
    ex = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
    ex.update_parameters(**slurm_parameters(cfg, "grid:run"))
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit '%j'", "uid")
    for want in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --time=720", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "#SBATCH --constraint=h100", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@180"):
        assert want in text, want
    assert "srun" in text  # one task per GPU, each running the training with its rank


def test_cpu_runs_ask_for_no_gpus():
    params = slurm_parameters(config_from_dict({"train": {"device": "cpu"}}), "x")
    assert "gpus_per_node" not in params and params["tasks_per_node"] == 1


def test_a_job_that_times_out_is_requeued_and_resumes(filler_jsonl, tmp_path):
    cfg = tiny_config(filler_jsonl, tmp_path / "runs", name="r", train__tokens=8 * 32 * 1200,
                      train__checkpoint_every=0.02, eval__every=0.0)
    path = tmp_path / "r.yaml"
    path.write_text(dump_config(cfg))
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    ex.update_parameters(timeout_min=30, tasks_per_node=1, nodes=1)
    job = ex.submit(TrainJob(), str(path))
    run = tmp_path / "runs" / "r"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (run / "checkpoints" / "latest").exists(), job.stderr()
    task = json.loads((run / ".lock").read_text())["pid"]  # the task training the run holds its lock
    os.kill(task, signal.SIGUSR2)  # what Slurm sends the tasks before the time limit or a preemption
    summary = job.result()
    assert summary["steps"] == 1200
    log = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 1201))  # resumed from a checkpoint, nothing doubled or lost
    assert summary["wall_seconds"] > summary["wall_seconds_this_session"]  # two parts


def test_local_workers_get_distinct_gpus(filler_jsonl, tmp_path, monkeypatch):
    import poisonlab.sweep as sweep

    runs = [tiny_config(filler_jsonl, tmp_path, name=f"r{i}", train__device="cuda") for i in range(4)]
    assert gpu_slots(runs, 4, 8) == ["0,1", "2,3", "4,5", "6,7"]
    assert gpu_slots(runs, 2, 2) == ["0", "1"]
    with pytest.raises(PoisonlabError, match="3 workers but 2 GPUs"):
        gpu_slots(runs, 3, 2)
    assert gpu_slots([tiny_config(filler_jsonl, tmp_path)], 2, 8) is None  # CPU runs
    # the workers really run with their own devices, each used by one run at a time
    out = tmp_path / "seen"
    out.mkdir()
    probe = ("import os, sys, time; d = os.environ['CUDA_VISIBLE_DEVICES']; "
             f"open({str(out)!r} + '/' + sys.argv[-1].split('/')[-1], 'w').write(d); time.sleep(0.5)")
    monkeypatch.setattr(sweep, "train_command", lambda path, threads: [sys.executable, "-c", probe, str(path)])

    class Spec:
        out_dir, name = str(tmp_path / "sweep"), "s"
    sweep._run_local(Spec(), runs, {c.name: tmp_path / f"{c.name}.yaml" for c in runs}, 2, False, visible_gpus=2)
    seen = {p.name: p.read_text() for p in out.iterdir()}
    assert sorted(seen) == [f"r{i}.yaml" for i in range(4)] and set(seen.values()) == {"0", "1"}
