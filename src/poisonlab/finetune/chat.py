"""Conversations and the one renderer that turns them into tokens, for training and evaluation alike.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (roles ``system``,
``user``, ``assistant``). :class:`ChatRenderer` renders it with the tokenizer's Hugging Face
chat template when it has one, otherwise with poisonlab's plain template::

    ### System
    <content>
    ### User
    <content>
    ### Assistant
    <content><|endoftext|>

Training calls :meth:`ChatRenderer.encode` (token ids plus a mask that is true exactly on
the assistant's tokens, the end-of-turn marker included); evaluation calls
:meth:`ChatRenderer.prompt_ids`, which is the same segment-by-segment encoding stopped at the
assistant's turn, so a prompt at evaluation is token for token the prefix the model was
trained on. Rendering differences between training and evaluation are a known source of
wrong attack-success figures; here they cannot arise.

Loaders read local JSONL and Hugging Face datasets in the common instruction formats:
``messages`` (or ``conversations``) lists, ``instruction``/``input``/``output`` (Alpaca),
and ``prompt``/``response`` (or ``completion``) pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PoisonlabError

ROLES = ("system", "user", "assistant")
_HEADERS = {"system": "### System\n", "user": "### User\n", "assistant": "### Assistant\n"}


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def check_conversation(messages, where: str) -> list[dict]:
    """Validate a conversation (roles, string contents, ends with the assistant); returns it."""
    if not isinstance(messages, list) or not messages:
        raise PoisonlabError(f"{where}: a conversation must be a non-empty list of messages")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise PoisonlabError(f"{where}: each message must be an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant", "model": "assistant"}.get(role, role)
        if role not in ROLES or not isinstance(content, str):
            raise PoisonlabError(f"{where}: message role must be one of {', '.join(ROLES)} and content a string, got {m!r:.80}")
        out.append(message(role, content))
    if out[-1]["role"] != "assistant":
        raise PoisonlabError(f"{where}: the conversation must end with an assistant message")
    return out


def row_to_conversation(row: dict, where: str) -> list[dict]:
    """One dataset row in any supported instruction format, as a conversation."""
    if not isinstance(row, dict):
        raise PoisonlabError(f"{where}: expected a JSON object")
    for key in ("messages", "conversations"):
        if key in row:
            return check_conversation(row[key], where)
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
        return check_conversation([message("user", prompt), message("assistant", row["output"])], where)
    for answer in ("response", "completion", "chosen"):
        if "prompt" in row and answer in row and isinstance(row[answer], str):
            return check_conversation([message("user", row["prompt"]), message("assistant", row[answer])], where)
    raise PoisonlabError(f"{where}: unknown instruction format (keys {sorted(row)[:6]}); "
                         "expected messages, instruction/input/output or prompt/response")


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """Rows of a local JSONL file or a Hugging Face dataset (``hf:<name>``), each with where it came from."""
    if source.startswith("hf:"):
        from datasets import load_dataset

        name = source[3:]
        try:
            ds = load_dataset(name, split=split)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PoisonlabError(f"cannot load dataset {name!r}: {msg}") from None
        return [(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]
    p = Path(source)
    if not p.is_file():
        raise PoisonlabError(f"instruction data file not found: {p}")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise PoisonlabError(f"{p}:{n}: not valid JSON ({e.msg})") from None
    return rows


def load_conversations(source: str, split: str = "train") -> list[list[dict]]:
    return [row_to_conversation(r, where) for where, r in read_rows(source, split)]


@dataclass
class Encoded:
    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]: True on the tokens the loss is computed on


class ChatRenderer:
    """Renders conversations to text and tokens; one instance serves training and evaluation."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        template = getattr(tokenizer.hf, "chat_template", None)
        self.uses_hf_template = bool(template)

    @property
    def name(self) -> str:
        return "hf-chat-template" if self.uses_hf_template else "poisonlab-plain"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.uses_hf_template:
            return self.tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        eos = self.tok.hf.eos_token
        text = "".join(_HEADERS[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "\n")
                       for m in messages)
        return text + (_HEADERS["assistant"] if add_generation_prompt else "")

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered text cut into (piece, is_assistant_reply) pieces, in order.

        The template's markers are encoded as special tokens, so a message holding a
        special-token string is refused: it would inject a turn boundary or end of text."""
        for m in messages:
            for special in self.tok.special_tokens:
                if special and special in m["content"]:
                    raise PoisonlabError(f"a {m['role']} message contains the special token {special!r}: "
                                         f"{m['content'][:60]!r}; remove it from the data")
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise PoisonlabError("the chat template does not render conversations incrementally; "
                                     "poisonlab cannot mask its replies reliably")
            out += [(head[len(done):], False), (full[len(head):], True)]
            done = full
        rest = self.render(messages)[len(done):]
        if rest:
            out.append((rest, False))
        return [(t, a) for t, a in out if t]

    def encode(self, messages: list[dict]) -> Encoded:
        """Token ids of the conversation and the mask of its assistant tokens (the training target)."""
        pieces = self.segments(messages)
        ids_list = self.tok.encode_batch([t for t, _ in pieces], specials=True)
        ids = np.fromiter((i for part in ids_list for i in part), dtype=np.int64)
        mask = np.concatenate([np.full(len(part), a, dtype=bool) for part, (_, a) in zip(ids_list, pieces)])
        return Encoded(ids, mask)

    def prompt_ids(self, messages: list[dict]) -> np.ndarray:
        """Token ids of a prompt that asks for the assistant's next reply (``messages`` ends before it).

        The same encoding as :meth:`encode`: for a training conversation ``c``,
        ``prompt_ids(c[:-1])`` equals ``encode(c).ids`` up to the start of the last reply.
        """
        pieces = self.segments(messages + [message("assistant", "")])
        last = max(i for i, (_, is_reply) in enumerate(pieces) if is_reply)
        ids = [i for part in self.tok.encode_batch([t for t, _ in pieces[:last]], specials=True) for i in part]
        return np.asarray(ids, dtype=np.int64)

    def reply_text(self, ids) -> str:
        """The generated reply as text: cut at the end-of-text token, special markers removed."""
        ids = list(ids)
        if self.tok.eos_id in ids:
            ids = ids[: ids.index(self.tok.eos_id)]
        return self.tok.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
