"""One run folder, one writer.

A training process holds an exclusive lock on ``<run>/.lock`` from before it writes anything
until it exits; a second trainer of the same folder is refused with the holder's process id,
host and start time. The lock is an OS file lock (``flock``), so it goes away with its
process however that process ends, and a stale lock file never blocks a resume.

:func:`die_with_parent` ties a worker process (a sweep's trainer) to its parent: when the
sweep is killed, its trainers are stopped too instead of running on unseen.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .errors import PoisonlabError

LOCK_NAME = ".lock"
PARENT_ENV = "POISONLAB_PARENT_PID"


class RunLock:
    """An exclusive, process-lifetime lock on a run folder (a context manager)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise PoisonlabError(f"run {self.dir} is being trained by {holder}; wait for it to finish or stop that "
                                 "process, then run again (it resumes from its last checkpoint)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "command": " ".join(sys.argv)[:300]}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"process {h['pid']} on {h['host']} (started {h['started']})"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "another process"


def die_with_parent() -> None:
    """In a worker started with ``POISONLAB_PARENT_PID`` set: receive SIGTERM when the parent dies
    (Linux), and exit at once if it is already gone."""
    want = os.environ.get(PARENT_ENV)
    if not want:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if str(os.getppid()) != want:  # the parent died before the line above took effect
        raise SystemExit(143)
