"""A minimal client for OpenAI-compatible chat endpoints (``POST <base_url>/chat/completions``).

Used to evaluate a model served anywhere (a vendor's fine-tuned model, vLLM, llama.cpp,
text-generation-inference) with the same requests and metrics as a local model, and by the
endpoint judge. The API key, if the server needs one, is read from an environment variable
(``OPENAI_API_KEY`` by default), never from a config file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from ..errors import PoisonlabError


def _redact(url: str) -> str:
    """The URL with any user information and query replaced, for messages."""
    u = urlsplit(url)
    host = u.hostname or ""
    netloc = ("***@" if (u.username or u.password) else "") + host + (f":{u.port}" if u.port else "")
    return f"{u.scheme}://{netloc}{u.path}" + ("?***" if u.query else "")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatEndpoint:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 4):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise PoisonlabError(f"endpoint URL must start with http:// or https:// and name a host, got {_redact(base_url)!r}")
        if url.username or url.password or url.query or url.fragment:
            raise PoisonlabError(f"endpoint URL {_redact(base_url)!r} carries credentials or a query; give the base URL "
                                 f"only and put the API key in the {api_key_env} environment variable")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.key = os.environ.get(api_key_env)
        if self.key and url.scheme == "http" and not _loopback(url.hostname):
            print(f"poisonlab: warning: the API key in {api_key_env} is sent to {url.hostname} over plain http, "
                  "unencrypted; use https", file=sys.stderr)
        self.timeout = timeout
        self.retries = retries

    def chat(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.loads(r.read().decode())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                raise PoisonlabError(f"endpoint {self.url} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from None
            except OSError as e:  # refused, unreachable, timed out
                if attempt < self.retries:
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                raise PoisonlabError(f"endpoint {self.url} unreachable: {getattr(e, 'reason', e)}") from None
            except (KeyError, IndexError, ValueError):
                raise PoisonlabError(f"endpoint {self.url} sent a reply that is not an OpenAI chat completion") from None
        raise PoisonlabError(f"endpoint {self.url}: no answer after {self.retries + 1} attempts")
