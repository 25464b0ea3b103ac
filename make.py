#!/usr/bin/env python3
"""Set up poisonlab in ./.venv (once) and run a task. Needs nothing but Python >= 3.11.

    python3 make.py demo      set up, then run the demo on the offline default corpus
    python3 make.py test      set up, then run the test suite (extra args go to pytest)
    python3 make.py setup     only set up
    python3 make.py lock      move the tested dependency set forward (docs/dependencies.md)

Dependencies are installed with ``constraints.txt`` as pip constraints: the versions the
suite was last tested with. ``pip install poisonlab`` elsewhere keeps the ranges of
``pyproject.toml``.

Torch: the CPU build ``torch==2.13.0`` is tried first (small, and found on disk on machines
that carry it); where it cannot be had, any torch the ranges allow is installed. An
environment that already has torch keeps it.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ROOT / "constraints.txt"
KRONFLUENCE = "kronfluence>=1.0,<2"
TORCH_FIRST, TORCH_RANGE = "torch==2.13.0", "torch>=2.2,<3"


def paths(env: Path) -> tuple[Path, Path]:
    bin_dir = env / ("Scripts" if os.name == "nt" else "bin")
    return bin_dir, bin_dir / "python"


def pip(py: Path, *args: str) -> int:
    return subprocess.call([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args])


def install(env: Path, constrained: bool) -> None:
    """Create ``env`` if needed and install torch and poisonlab[dev] into it."""
    _, py = paths(env)
    if not py.exists():
        print(f"creating {env.name} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(env)
    has_torch = subprocess.call([str(py), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        print("installing torch (CPU build) ...", flush=True)
        if pip(py, TORCH_FIRST) != 0 and pip(py, TORCH_RANGE) != 0:
            sys.exit("could not install torch")
    print("installing poisonlab and its dependencies" + (" (tested set)" if constrained else "") + " ...", flush=True)
    extra = ["-c", str(CONSTRAINTS)] if constrained else []
    if pip(py, *extra, "-e", f"{ROOT}[dev]") != 0:
        sys.exit("could not install poisonlab" + (f" with the tested set in {CONSTRAINTS.name}" if constrained else ""))
    # kronfluence declares torchvision, which it never imports; PyPI's torchvision would replace
    # the CPU build of torch with a CUDA one of several GB, and does not import beside it. Its
    # real dependencies come with the attribution extra (in dev above).
    if pip(py, *extra, "--no-deps", KRONFLUENCE) != 0:
        sys.exit("could not install kronfluence (training-data attribution)")


def setup() -> Path:
    if sys.version_info < (3, 11):
        sys.exit("poisonlab needs Python >= 3.11")
    env = ROOT / ".venv"
    marker = env / ".poisonlab-installed"
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()
    if not (marker.is_file() and marker.read_text() == stamp):
        install(env, constrained=True)
        marker.write_text(stamp)
    return env


def lock(extra: list[str]) -> int:
    """Resolve the newest releases the ranges allow in a scratch environment, run the suite
    there, and write them to constraints.txt only if it passes."""
    env = ROOT / ".venv-lock"
    shutil.rmtree(env, ignore_errors=True)
    install(env, constrained=False)
    _, py = paths(env)
    if subprocess.call([str(py), "-m", "pytest", "-q", *extra], cwd=ROOT) != 0:
        print(f"the suite fails with the newest releases: {CONSTRAINTS.name} left as it is; "
              f"fix the code or bound the range in pyproject.toml, then run make.py lock again", file=sys.stderr)
        return 1
    frozen = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    keep = [line for line in frozen if line and not line.startswith("#")
            and not line.lower().startswith(("torch==", "nvidia-", "triton==", "poisonlab"))]
    header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
    CONSTRAINTS.write_text("\n".join(header + sorted(keep, key=str.lower)) + "\n")
    print(f"wrote {len(keep)} pins to {CONSTRAINTS.name}; review the diff and commit it")
    return 0


def main() -> int:
    task, extra = (sys.argv[1] if len(sys.argv) > 1 else "test"), sys.argv[2:]
    if task not in {"setup", "demo", "test", "lock", "corpora"}:
        sys.exit(f"unknown task {task!r}: use setup, demo, test, lock or corpora")
    if task == "lock":
        return lock(extra)
    bin_dir, py = paths(setup())
    if task == "demo":
        return subprocess.call([str(bin_dir / "poisonlab"), "demo", *extra], cwd=ROOT)
    if task == "test":
        return subprocess.call([str(py), "-m", "pytest", "-q", *extra], cwd=ROOT)
    if task == "corpora":  # the Debian packages behind the cpu-headline experiment's corpus
        return subprocess.call([str(bin_dir / "poisonlab"), "sweep", "cpu-headline", "--fetch", "--dry-run", *extra],
                               cwd=ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
