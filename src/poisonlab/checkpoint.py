"""Checkpoints: weights and optimizer state in safetensors, trainer state in JSON.

A checkpoint folder is a complete Hugging Face model folder (``config.json`` and
``model.safetensors``) plus ``optimizer.safetensors`` and ``trainer_state.json``, and it is
labelled (see :mod:`poisonlab.artifacts`). It is written under a temporary name and renamed
into place, then ``latest`` is updated atomically: a run killed at any moment finds either
the previous checkpoint or the new one, complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artifacts import safetensors_metadata, write_labels
from .errors import PoisonlabError
from .paths import atomic_write_text

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_model_folder(directory: Path, model, label: dict) -> None:
    """Write an ``AutoModelForCausalLM``-loadable, labelled model folder."""
    m = unwrap(model)
    directory.mkdir(parents=True, exist_ok=True)
    m.config.save_pretrained(str(directory))
    save_file(model_tensors(m), str(directory / "model.safetensors"), metadata=safetensors_metadata(label))
    write_labels(directory, label)


def _tied(m) -> set[str]:
    """Names of state-dict entries that share storage with an earlier entry (tied output weights)."""
    seen, tied = set(), set()
    for k, v in m.state_dict().items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            tied.add(k)
        seen.add(ptr)
    return tied


def model_tensors(m) -> dict[str, torch.Tensor]:
    """The state dict as Hugging Face stores it: tied output weights left out, contiguous, on CPU."""
    skip = _tied(m)
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items() if k not in skip}


def load_model_tensors(m, path: Path) -> None:
    missing, unexpected = m.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - _tied(m):
        raise PoisonlabError(f"{path} does not match the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, label: dict, keep: int) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, model, label)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_text(tmp / "trainer_state.json", json.dumps({**state, "step": step, "param_groups": groups}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore weights and optimizer state in place; returns the trainer state."""
    state_path = path / "trainer_state.json"
    if not state_path.is_file():
        raise PoisonlabError(f"{path} is not a poisonlab checkpoint (trainer_state.json missing)")
    state = json.loads(state_path.read_text())
    load_model_tensors(unwrap(model), path / "model.safetensors")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        _load_optimizer(optimizer, tensors, state["param_groups"])
    return state


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{idx}.{k}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})
