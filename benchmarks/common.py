"""Shared helpers for the benchmarks: timing, the machine's fp32 matmul rate, thread setup."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n: int = 1024, dtype=torch.float32, device: str = "cpu", seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n x n matmul in this process, with its current thread count.

    On CPU this is the reference for model FLOPs utilisation: the rate the same process
    reaches on the operation a transformer spends its FLOPs on, measured in the same run.
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    reps, best = 0, 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=c)
        sync()
        dt = time.perf_counter() - t
        best = max(best, 4 * 2 * n**3 / dt)
        reps += 4
    return best


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {cores()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _with_threads(fn, args, kwargs):
    torch.set_num_threads(cores())
    return fn(*args, **kwargs)


def in_fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new interpreter using every core this one may use.

    For measurements that change the process for good, such as the allocator setting of
    poisonlab's CPU training (:mod:`poisonlab.allocator`): each starts from the C library's
    defaults, as a plain script does. ``fn`` must be importable (a module-level function).
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_with_threads, fn, args, kwargs).result()
