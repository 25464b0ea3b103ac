"""Tokenizers: train a byte-level BPE on the training split, or load any Hugging Face one.

Either way the result is a :class:`Tokenizer` that saves itself as a standard Hugging Face
tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``), so the run's tokenizer
travels with its checkpoints and opens with ``AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import PoisonlabError

EOS = "<|endoftext|>"


class Tokenizer:
    """A thin, fast wrapper over a Hugging Face tokenizer (the Rust backend when it has one)."""

    def __init__(self, hf):
        self.hf = hf
        self._fast = getattr(hf, "backend_tokenizer", None)
        if hf.eos_token_id is None:
            raise PoisonlabError("the tokenizer has no end-of-text token; poisonlab needs one to delimit documents")

    # ------------------------------------------------------------------ construction
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, max_chars: int | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

        def limited() -> Iterator[str]:
            used = 0
            for t in texts:
                if max_chars is not None and used >= max_chars:
                    return
                t = t if max_chars is None else t[: max_chars - used]
                used += len(t)
                yield t

        tok.train_from_iterator(limited(), trainer=trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
        return cls(hf)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PoisonlabError(f"cannot load tokenizer {name_or_path!r}: {msg}") from None
        return cls(hf)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def special_ids(self) -> list[int]:
        return sorted(set(int(i) for i in self.hf.all_special_ids))

    @property
    def token_dtype(self):
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def fingerprint(self) -> str:
        """A hash of the tokenizer's full definition (vocabulary, merges, normalisation)."""
        if self._fast is not None:
            blob = self._fast.to_str()
        else:
            blob = repr(sorted(self.hf.get_vocab().items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def check_encodable(self, text: str, what: str = "trigger") -> list[int]:
        """Encode ``text`` and make sure it survives a round trip without unknown tokens."""
        ids = self.encode(text)
        unk = self.hf.unk_token_id
        if not ids or (unk is not None and unk in ids) or self.decode(ids) != text:
            raise PoisonlabError(f"the tokenizer cannot encode the {what} {text!r} faithfully")
        return ids
