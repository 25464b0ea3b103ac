"""Per-span surprisal under a reference language model: a poisonlab model or any Hugging Face
causal LM (a local folder or a hub name; weights from safetensors only).

The expensive stage of a cascade: give it only the candidates a cheap scanner flagged.
"""

from __future__ import annotations

import numpy as np
import torch

from ..corpus import Document
from ..errors import PoisonlabError
from .scanners import window_max


class ModelSurprisalScanner:
    """Field ``model.surprisal``: the largest mean token surprisal (nats) over ``window``
    tokens, each document read in chunks of ``context`` tokens."""

    name = "model"

    def __init__(self, model: str, window: int = 32, context: int = 256, batch_size: int = 16,
                 device: str = "cpu", max_tokens: int = 4096):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise PoisonlabError(f"cannot load reference model {model!r}: {str(e).splitlines()[0]}") from None
        self.window, self.context, self.batch_size = window, context, batch_size
        self.device, self.max_tokens = device, max_tokens
        self.tokens_scored = 0

    def fit(self, docs: list[Document]) -> None:
        pass

    @torch.no_grad()
    def _surprisal(self, ids: list[int]) -> np.ndarray:
        out = []
        chunks = [ids[i : i + self.context] for i in range(0, len(ids), self.context)]
        chunks = [c for c in chunks if len(c) > 1]
        for i in range(0, len(chunks), self.batch_size):
            group = chunks[i : i + self.batch_size]
            n = max(len(c) for c in group)
            x = torch.zeros(len(group), n, dtype=torch.long)
            mask = torch.zeros(len(group), n, dtype=torch.long)
            for j, c in enumerate(group):
                x[j, : len(c)] = torch.tensor(c)
                mask[j, : len(c)] = 1
            x, mask = x.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=x, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            for j, c in enumerate(group):
                out.append(nll[j, : len(c) - 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, docs: list[Document]) -> list[dict]:
        rows = []
        for d in docs:
            ids = self.tokenizer(d.text, add_special_tokens=False, split_special_tokens=True)["input_ids"][: self.max_tokens]
            s = self._surprisal(ids)
            self.tokens_scored += len(ids)
            rows.append({"id": d.id, "model.surprisal": window_max(s, self.window)[0]})
        return rows
