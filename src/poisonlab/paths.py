"""Safe names and paths: nothing named in a config may write outside the folder it belongs in."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import PoisonlabError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a plain file-name component, else raise."""
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."} or ".." in name:
        raise PoisonlabError(
            f"invalid {what} {name!r}: use letters, digits and . _ = + - only (no slashes, no '..')"
        )
    return name


def safe_join(base: str | os.PathLike, name: str, what: str = "name") -> Path:
    """Join a single checked name under ``base`` and verify the result stays inside it."""
    check_name(name, what)
    base_path = Path(base).resolve()
    path = (base_path / name).resolve()
    if path.parent != base_path:
        raise PoisonlabError(f"{what} {name!r} would write outside {base_path}")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that a crash leaves either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
