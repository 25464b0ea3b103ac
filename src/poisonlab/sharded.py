"""Sharded checkpoints: every rank writes its own shards as safetensors, nobody gathers.

Under FSDP2 each parameter (and each optimizer moment) is split along its first dimension,
rank ``r`` of ``W`` holding rows ``[r * c, (r + 1) * c)`` with ``c = ceil(rows / W)``. A
sharded checkpoint folder holds ``model-rank00000.safetensors`` ... and
``optimizer-rank00000.safetensors`` ... (each rank's local rows), per-rank checksum files,
and rank 0's ``trainer_state.json``, ``config.json`` and labels.

Reading works at any world size, sharded or not: the rows a process needs are found in
whichever files hold them (a file's rows follow its rank's), and only those rows are read
(``safe_open(...).get_slice``), so no process loads the whole state unless it trains the
whole model. A plain checkpoint (``model.safetensors``, ``optimizer.safetensors``) is read by
the same code as a one-rank sharded one. Nothing here unpickles: the format is safetensors
and JSON, written by poisonlab.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import PoisonlabError


def local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of a first dimension of ``rows`` that FSDP2 gives ``rank`` of ``world``."""
    chunk = math.ceil(rows / world) if rows else 0
    return min(rows, rank * chunk), min(rows, (rank + 1) * chunk)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor (a DTensor's local shard, or the tensor itself), on CPU."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().contiguous()


class ShardedReader:
    """The tensors of a set of files, each file holding consecutive rows of every tensor in it
    (files in rank order); reads any row range of any tensor."""

    def __init__(self, files: list[Path]):
        if not files:
            raise PoisonlabError("no tensor files to read")
        self.files = files
        self.parts: dict[str, list[tuple[Path, int, int]]] = {}
        self.shapes: dict[str, list[int]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    shape = list(h.get_slice(key).get_shape())
                    parts = self.parts.setdefault(key, [])
                    if not shape:  # a scalar (an optimizer's step count): the same on every rank
                        if not parts:
                            parts.append((f, 0, 0))
                            self.shapes[key] = []
                        continue
                    start = parts[-1][2] if parts else 0
                    parts.append((f, start, start + shape[0]))
                    rest = self.shapes.setdefault(key, [0, *shape[1:]])
                    if rest[1:] != shape[1:]:
                        raise PoisonlabError(f"{f}: {key} has shape {shape}, other shards {rest}")
                    rest[0] = start + shape[0]

    def keys(self) -> set[str]:
        return set(self.parts)

    def shape(self, key: str) -> list[int]:
        return self.shapes[key]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``key`` (all rows by default)."""
        if key not in self.parts:
            raise PoisonlabError(f"{key} is not in {self.files[0].parent}")
        parts = self.parts[key]
        if not self.shapes[key]:
            f = parts[0][0]
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key)
        rows = self.shapes[key][0]
        start, stop = (0 if start is None else start), (rows if stop is None else stop)
        pieces = []
        for f, a, b in parts:
            lo, hi = max(start, a), min(stop, b)
            if lo < hi:
                with safe_open(str(f), framework="pt") as h:
                    pieces.append(h.get_slice(key)[lo - a : hi - a])
        if not pieces:
            with safe_open(str(parts[0][0]), framework="pt") as h:
                return h.get_slice(key)[0:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def read_like(self, key: str, target: torch.Tensor) -> torch.Tensor:
        """The part of tensor ``key`` that ``target`` holds: its own rows when ``target`` is an
        FSDP2 shard (a DTensor sharded on dim 0), the whole tensor otherwise."""
        want = list(target.shape)
        if want != self.shapes[key]:
            raise PoisonlabError(f"{key}: the checkpoint holds shape {self.shapes[key]}, the model {want}")
        if hasattr(target, "to_local") and want:
            mesh = target.device_mesh
            start, stop = local_rows(want[0], mesh.get_local_rank(), mesh.size())
            got = self.read(key, start, stop)
            if got.shape != target.to_local().shape:
                raise PoisonlabError(f"{key}: shard of {tuple(got.shape)} rows does not fit the local "
                                     f"{tuple(target.to_local().shape)}")
            return got
        return self.read(key)


def as_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (this rank's rows) as a tensor of ``target``'s kind: a DTensor with the same
    sharding when ``target`` is one."""
    value = value.to(device=target.device, dtype=target.dtype)
    if hasattr(target, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value, target.device_mesh, target.placements, shape=target.shape,
                                  stride=target.stride(), run_check=False)
    return value
