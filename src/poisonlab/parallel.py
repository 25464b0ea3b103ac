"""Processes, devices and parallelism: everything the training loop does not need to know.

``torchrun --nproc_per_node N`` starts N processes; :func:`init_distributed` joins them into
one process group whose backend follows the device each process actually trains on (NCCL
on CUDA, gloo on CPU), with an explicit timeout. :func:`parallelize` then wraps the model
for data parallelism (DDP), so the loop itself is the same on one CPU and on many GPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .allocator import keep_freed_memory
from .config import RunConfig
from .errors import PoisonlabError

DIST_TIMEOUT = timedelta(minutes=30)
"""How long a collective may wait for a slow rank before the job fails (checkpoints of the
largest models take minutes; a dead rank is caught sooner by torchrun, which stops the rest)."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _local_device(device: str, local_rank: int) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{local_rank}"
    return device


def main_first(d: Dist, make):
    """``make(main)`` on the main process, then, once it has finished (it creates what the
    others open), on every other process; returns this process's result."""
    out = make(True) if d.main else None
    d.barrier()
    return out if d.main else make(False)


def init_distributed(device: str) -> Dist:
    """Join the process group of a ``torchrun`` launch (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if _local_device(device, local).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(cfg: RunConfig, d: Dist) -> tuple[torch.device, torch.dtype]:
    dev = _local_device(cfg.train.device, d.local_rank)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise PoisonlabError("train.device is cuda but no CUDA device is available")
    device = torch.device(dev)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the loss, the norm) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    name = cfg.train.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, name)


def set_threads(cfg: RunConfig, d: Dist, device: torch.device) -> int:
    """Threads for this process (the cores it may run on, shared among the local ranks) and,
    on CPU, the allocator setting of ``train.keep_freed_memory``; returns the thread count."""
    n = cfg.train.threads or max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    torch.set_num_threads(n)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    return n


def parallelize(model, cfg: RunConfig, d: Dist, device: torch.device, dtype: torch.dtype, mode: str = "ddp"):
    """The model as the loop trains it: itself on one process; on several, wrapped in DDP or
    sharded with FSDP2 (``fully_shard`` on every decoder layer, then on the root), with bf16
    parameters and fp32 gradient reduction when the run computes in bf16."""
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if d.world <= 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's parameters are gathered again at once by the backward pass: keep them
        fully_shard(layer, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=policy)
    return model


def decoder_layers(model) -> list:
    """The repeated blocks of a causal LM (Llama-style ``model.layers``, GPT-2-style ``transformer.h``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return list(node)
    raise PoisonlabError(f"train.parallelism fsdp: cannot find the decoder layers of {type(model).__name__}")


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


@contextmanager
def gradient_sync(model, sync: bool):
    """A context in which backward passes reduce gradients across processes only if ``sync``
    (skipped for every micro-batch but the last of a step)."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def full_value(t) -> torch.Tensor:
    """A tensor's whole value (a sharded DTensor is gathered from every rank)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextmanager
def failing_together(d: Dist):
    """Run the body; if it raises on this rank, end the process group at once instead of leaving
    the other ranks waiting at their next collective until the timeout. (Under torchrun the
    agent then stops the other ranks; the error itself propagates unchanged.)"""
    try:
        yield
    except BaseException:
        if d.world > 1 and dist.is_initialized():
            try:
                dist.abort_process_group() if hasattr(dist, "abort_process_group") else dist.destroy_process_group()
            except Exception:  # the group may already be broken; the original error matters
                pass
        raise
