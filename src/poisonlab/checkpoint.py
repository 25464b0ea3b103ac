"""Checkpoints: weights and optimizer state in safetensors, trainer state in JSON.

A checkpoint folder is a complete Hugging Face model folder (``config.json`` and
``model.safetensors``) plus ``optimizer.safetensors`` and ``trainer_state.json``, and it is
labelled (see :mod:`poisonlab.artifacts`). It is written under a temporary name and renamed
into place, then ``latest`` is updated atomically: a run killed at any moment finds either
the previous checkpoint or the new one, complete. ``checksums.json`` holds the SHA-256 of
every file; :func:`resume` verifies them and falls back to the newest checkpoint that is
intact, so a file damaged on disk is never trained on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifacts import safetensors_metadata, write_labels
from .errors import PoisonlabError
from .parallel import full_value, is_sharded
from .paths import atomic_write_text
from .provenance import file_sha256
from .sharded import ShardedReader, as_like, local

_STEP_DIR = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "checksums.json"


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_model_folder(directory: Path, model, label: dict, tensors: dict | None = None) -> None:
    """Write an ``AutoModelForCausalLM``-loadable, labelled model folder (``tensors``: the
    model's full tensors when already gathered, as :func:`model_tensors` gives them)."""
    m = unwrap(model)
    directory.mkdir(parents=True, exist_ok=True)
    m.config.save_pretrained(str(directory))
    save_file(tensors if tensors is not None else model_tensors(m), str(directory / "model.safetensors"),
              metadata=safetensors_metadata(label))
    write_labels(directory, label)


def _tied(m) -> set[str]:
    """Names of state-dict entries that are the same parameter as an earlier entry (tied output weights)."""
    seen, tied = set(), set()
    for k, v in m.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.add(k)
        seen.add(id(v))
    return tied


def model_tensors(m) -> dict[str, torch.Tensor]:
    """The state dict as Hugging Face stores it: tied output weights left out, contiguous, on CPU.
    FSDP2 shards are gathered, so every rank of a sharded model must call this together."""
    skip = _tied(m)
    return {k: full_value(v).detach().cpu().contiguous() for k, v in m.state_dict().items() if k not in skip}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, label: dict, keep: int) -> Path:
    """Save a checkpoint (on the main process; on every process of an FSDP2-sharded model)."""
    if is_sharded(unwrap(model)):
        return _save_sharded(run_dir, step, unwrap(model), optimizer, state, label, keep)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, model, label)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_text(tmp / "trainer_state.json", json.dumps({**state, "step": step, "param_groups": groups}, indent=1))
    sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_text(tmp / CHECKSUMS, json.dumps(sums, indent=1))
    _publish(run_dir, tmp, final, keep)
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """Move a complete checkpoint folder into place, point ``latest`` at it, drop the oldest."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(run_dir / "checkpoints" / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        p = run_dir / "checkpoints" / pointer.read_text().strip()
        if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file():
            return p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`PoisonlabError` unless every file listed in ``checksums.json`` is intact.

    Checkpoints written before checksums existed are checked when they are read instead."""
    sums: dict[str, str] = {}
    for sums_path in sorted(path.glob("checksums*.json")):  # one file, or one per rank of a sharded checkpoint
        try:
            sums.update(json.loads(sums_path.read_text()))
        except (OSError, ValueError) as e:
            raise PoisonlabError(f"{path}: {sums_path.name} unreadable ({e})") from None
    for name, want in sums.items():
        f = path / name
        if not f.is_file():
            raise PoisonlabError(f"{path}: {name} missing")
        if file_sha256(f) != want:
            raise PoisonlabError(f"{path}: {name} does not match its checksum")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Verify a checkpoint, then restore weights and optimizer state in place; returns the trainer
    state. Everything this process needs is read and checked before the model is touched, so a
    damaged checkpoint raises :class:`PoisonlabError` and leaves the model as it was. Plain and
    sharded checkpoints load into plain and FSDP2-sharded models alike, at any world size."""
    state_path = path / "trainer_state.json"
    if not state_path.is_file():
        raise PoisonlabError(f"{path} is not a poisonlab checkpoint (trainer_state.json missing)")
    verify_checkpoint(path)
    m = unwrap(model)
    targets = {k: v for k, v in m.state_dict().items() if k not in _tied(m)}
    try:
        state = json.loads(state_path.read_text())
        step, groups = int(state["step"]), state["param_groups"]
        weights_in = ShardedReader(sorted(path.glob("model-rank*.safetensors")) or [path / "model.safetensors"])
        missing, unexpected = set(targets) - weights_in.keys(), weights_in.keys() - set(targets)
        if missing or unexpected:
            raise PoisonlabError(f"{path} does not match the model (missing {sorted(missing)[:3]}, "
                                 f"unexpected {sorted(unexpected)[:3]})")
        weights = {k: weights_in.read_like(k, v) for k, v in targets.items()}
        opt_state = None
        if optimizer is not None:
            opt_in = ShardedReader(sorted(path.glob("optimizer-rank*.safetensors")) or [path / "optimizer.safetensors"])
            params = [p for g in optimizer.param_groups for p in g["params"]]
            opt_state = {}
            for key in opt_in.keys():
                idx, name = key.split(".", 1)
                p = params[int(idx)]
                value = opt_in.read(key) if not opt_in.shape(key) else as_like(opt_in.read_like(key, p), p)
                opt_state.setdefault(int(idx), {})[name] = value
    except PoisonlabError as e:
        raise PoisonlabError(f"{path} is damaged or does not fit ({e})") from None
    except Exception as e:  # json, safetensors and OS errors: the files are not what we wrote
        raise PoisonlabError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    with torch.no_grad():
        for k, v in weights.items():
            dest = targets[k].to_local() if hasattr(targets[k], "to_local") else targets[k]
            dest.copy_(v.to(dtype=dest.dtype))
    if optimizer is not None:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    state["step"] = step
    return state


def _save_sharded(run_dir: Path, step: int, m, optimizer, state: dict, label: dict, keep: int) -> Path:
    """Every rank writes its shards into one temporary folder; rank 0 renames it into place."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ckpt_root = run_dir / "checkpoints"
    final, tmp = ckpt_root / f"step-{step:08d}", ckpt_root / f".tmp-step-{step:08d}-sharded"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    skip = _tied(m)
    mine = [tmp / f"model-rank{rank:05d}.safetensors", tmp / f"optimizer-rank{rank:05d}.safetensors"]
    save_file({k: local(v) for k, v in m.state_dict().items() if k not in skip}, str(mine[0]),
              metadata=safetensors_metadata(label))
    opt_tensors, groups = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(mine[1]))
    if rank == 0:
        m.config.save_pretrained(str(tmp))
        write_labels(tmp, label)
        atomic_write_text(tmp / "trainer_state.json", json.dumps(
            {**state, "step": step, "param_groups": groups,
             "sharded": {"world": dist.get_world_size(), "rows": "ceil(rows / world) per rank"}}, indent=1))
        mine += [tmp / "config.json", tmp / "poisonlab.json", tmp / "README.md", tmp / "trainer_state.json"]
    atomic_write_text(tmp / f"checksums-rank{rank:05d}.json", json.dumps({p.name: file_sha256(p) for p in mine}, indent=1))
    dist.barrier()
    if rank == 0:
        _publish(run_dir, tmp, final, keep)
    dist.barrier()
    return final


def resume(run_dir: Path, model, optimizer) -> dict | None:
    """Load the newest intact checkpoint of a run (its trainer state), or None when there is none.

    A damaged checkpoint is reported on stderr and the one before it is tried."""
    newest = latest_checkpoint(run_dir)
    candidates = sorted(set(list_checkpoints(run_dir)) | ({newest} if newest else set()), reverse=True)
    for path in candidates:
        try:
            return load_checkpoint(path, model, optimizer)
        except PoisonlabError as e:
            print(f"poisonlab: warning: {e}; trying an earlier checkpoint", file=sys.stderr)
    if candidates:
        print(f"poisonlab: warning: no intact checkpoint in {run_dir / 'checkpoints'}; training from the start",
              file=sys.stderr)
    return None


def remove_partial_checkpoints(run_dir: Path) -> int:
    """Delete the temporary folders of checkpoints whose writer was killed; returns how many."""
    root = run_dir / "checkpoints"
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-step-")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state as flat ``<param index>.<name>`` tensors (this rank's shard of a
    sharded model's), and its parameter groups."""
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{k}": local(v if torch.is_tensor(v) else torch.tensor(v))
               for idx, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]
