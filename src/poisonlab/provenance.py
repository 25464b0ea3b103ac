"""What a result was computed with: code version, environment, hashes of files."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from . import __version__


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<hash of the package's source files>``, plus the git commit when known.

    The source hash identifies the code that ran even when it was installed without git.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    version = f"{__version__}+src.{h.hexdigest()[:12]}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}.git.{commit}" if commit else version


def source_hash(version: str) -> str:
    """The part of :func:`code_version` that identifies the code itself."""
    return version.split(".git.")[0]


def environment() -> dict:
    import numpy
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (each name, dtype, shape and bytes, in name
    order): equal for equal weights. The file's own hash also covers the header's metadata,
    whose key order safetensors does not fix, so two saves of the same weights can differ."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_hashes(path: str | Path) -> dict:
    """``model_sha256`` (the file) and ``weights_sha256`` (its tensors) of a safetensors file,
    None for both when it is absent: what a record of work on a model names it by."""
    present = Path(path).is_file()
    return {"model_sha256": file_sha256(path) if present else None,
            "weights_sha256": weights_sha256(path) if present else None}
