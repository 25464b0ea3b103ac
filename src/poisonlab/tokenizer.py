"""Tokenizers: train a byte-level BPE on the training split, or load any Hugging Face one.

Either way the result is a :class:`Tokenizer` that saves itself as a standard Hugging Face
tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``), so the run's tokenizer
travels with its checkpoints and opens with ``AutoTokenizer``.

Text is text: corpus documents, poisons and prompts are encoded with special-token strings
such as ``<|endoftext|>`` read as ordinary characters, so no document can plant a document
boundary or any other control token. Only a chat template's own markers are encoded as
special tokens (``specials=True``), and then the messages must not contain any.
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
        self.plain = None
        """The Rust backend with special-token strings read as plain text (None without one)."""
        if self._fast is not None:
            from tokenizers import Tokenizer as RustTokenizer

            self.plain = RustTokenizer.from_str(self._fast.to_str())
            self.plain.encode_special_tokens = True

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

        from .hub import check_source

        check_source(str(name_or_path), "tokenizer")
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
    @property
    def special_tokens(self) -> list[str]:
        """The strings of the special tokens (``<|endoftext|>`` and any others the tokenizer has)."""
        return sorted({str(t) for t in self.hf.all_special_tokens} | {str(t) for t in getattr(
            self.hf, "added_tokens_decoder", {}).values() if getattr(t, "special", False)})

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are plain text unless ``specials``."""
        return self.encode_batch([text], specials)[0]

    def encode_batch(self, texts: list[str], specials: bool = False) -> list[list[int]]:
        backend = self._fast if specials else self.plain
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [self.hf.encode(t, add_special_tokens=False, split_special_tokens=not specials) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def check_encodable(self, text: str, what: str = "trigger") -> list[int]:
        """Encode ``text`` and make sure it survives a round trip without unknown tokens and holds
        no special-token string (which a pipeline could turn into a control token)."""
        for special in self.special_tokens:
            if special and special in text:
                raise PoisonlabError(f"the {what} {text!r} contains the special token {special!r}; choose text "
                                     "without special-token strings")
        ids = self.encode(text)
        unk = self.hf.unk_token_id
        if not ids or (unk is not None and unk in ids) or self.decode(ids) != text:
            raise PoisonlabError(f"the tokenizer cannot encode the {what} {text!r} faithfully")
        return ids
