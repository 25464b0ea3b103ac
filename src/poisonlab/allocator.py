"""How a CPU training process gets its memory from the C library.

glibc's ``malloc`` hands every block of 32 MiB or more to the kernel as a fresh mapping and
unmaps it when it is freed. A training step on CPU allocates several such blocks (the logits of
a 32 x 128-token batch over a 2,048-token vocabulary are exactly 32 MiB, and so are their
log-softmax and both gradients), so at every step the kernel maps them again and zero-fills
them page by page: on a 2-core machine an element-wise ``exp`` over such a tensor took 27 ms
into a fresh tensor against 12 ms into a reused one, and a training step of the 1m model took
1.26 times as long as with the setting below.
:func:`keep_freed_memory` makes ``malloc`` serve every block from its heap and keep what is
freed there for the next step. What it costs: memory freed after the peak is returned only
when the process ends, and the heap holds a few freed blocks beside the live tensors (peak
memory 2-6% higher in the training benchmark). docs/performance.md has the measurements.

The same setting can be given to any process on glibc from the environment:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = 2**31 - 1
_applied = False


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc, the only C library the setting exists in."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Serve all allocations of this process from malloc's heap and never trim it (glibc only).

    Returns True when the setting is in force (now or from an earlier call); False where the C
    library is not glibc (macOS, musl, Windows), where it does nothing. It cannot be undone for
    the rest of the process.
    """
    global _applied
    if _applied:
        return True
    if not on_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
    return _applied
