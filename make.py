#!/usr/bin/env python3
"""Set up poisonlab in ./.venv (once) and run a task. Needs nothing but Python >= 3.11.

    python3 make.py demo      set up, then run the demo on the offline default corpus
    python3 make.py test      set up, then run the test suite (extra args go to pytest)
    python3 make.py setup     only set up

Torch: the CPU build ``torch==2.13.0`` is tried first (small, and found on disk on machines
that carry it); where it cannot be had, any torch >= 2.2 is installed. An environment that
already has torch keeps it.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
MARKER = VENV / ".poisonlab-installed"


def pip(*args: str) -> int:
    return subprocess.call([str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args])


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit("poisonlab needs Python >= 3.11")
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if MARKER.is_file() and MARKER.read_text() == stamp:
        return
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    has_torch = subprocess.call([str(PY), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        print("installing torch (CPU build) ...", flush=True)
        if pip("torch==2.13.0") != 0 and pip("torch>=2.2") != 0:
            sys.exit("could not install torch")
    print("installing poisonlab and its dependencies ...", flush=True)
    if pip("-e", f"{ROOT}[dev]") != 0:
        sys.exit("could not install poisonlab")
    MARKER.write_text(stamp)


def main() -> int:
    task, extra = (sys.argv[1] if len(sys.argv) > 1 else "test"), sys.argv[2:]
    if task not in {"setup", "demo", "test"}:
        sys.exit(f"unknown task {task!r}: use setup, demo or test")
    setup()
    if task == "demo":
        return subprocess.call([str(BIN / "poisonlab"), "demo", *extra], cwd=ROOT)
    if task == "test":
        return subprocess.call([str(PY), "-m", "pytest", "-q", *extra], cwd=ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
