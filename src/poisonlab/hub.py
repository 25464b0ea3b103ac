"""Model and tokenizer names: a local folder, or a Hugging Face hub id that can be fetched now.

Loading a name that is neither would make the Hugging Face libraries retry the network for
about a minute before failing; :func:`check_source` fails at once, in one line.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import PoisonlabError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in {"1", "true", "yes", "on"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT`` or huggingface.co) accepts a connection now."""
    if offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(hub_id, name), str):
                return True
        except Exception:  # an id the cache layout cannot hold
            return False
    return False


def check_source(name: str, what: str = "model") -> None:
    """Raise :class:`PoisonlabError` unless ``name`` is an existing folder, a hub id in the local
    cache, or a hub id while the hub can be reached."""
    if Path(name).exists():
        if not Path(name).is_dir():
            raise PoisonlabError(f"{what} {name!r} is a file; give a model folder (config.json, model.safetensors)")
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or not _HUB_ID.match(name)
    if looks_local:
        raise PoisonlabError(f"{what} {name!r} not found: no such folder")
    if _cached(name):
        return
    if not hub_reachable():
        raise PoisonlabError(f"{what} {name!r} is not a local folder, not in the Hugging Face cache, and the hub "
                             "cannot be reached (offline); give a local folder")
