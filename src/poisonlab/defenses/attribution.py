"""Training-data attribution: trace a model's triggered behaviour back to the documents it
was trained on, with kronfluence (Grosse et al. 2023).

The query is what a defender sees: held-out prompts with the trigger and the model's own
continuations of them; the measurement is the continuations' loss or entropy. Every training
document the run read (its clean documents and its poisons, cut into windows of the run's
sequence length) gets a score from its windows' influences (averaged over the queries):
their sum, mean or maximum. Methods:

- ``ekfac``: influence functions with an eigenvalue-corrected Kronecker-factored Hessian;
- ``identity``: the same scores with the identity for the Hessian, i.e. the dot product of
  the query and training gradients (gradient similarity, the cheap baseline);
- ``random`` and ``length`` (controls, no gradients): scores drawn at random, and the
  document's length in tokens. Poisons whose payload is long are found by length alone, so
  every ranking also reports the length-matched AUROC (each poison compared only with clean
  documents of as many windows).

Both track the Linear layers of the transformer blocks (not the output head), as is usual
for language models. A run's poisons are known, so the ranking is scored: recall of the
poisons among the top k documents (k = the number of poisons; precision at that k is the same
number), the curve over k, and the area under the ROC curve.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PoisonlabError
from ..metrics.roc import auroc, stratified_auroc

METHODS = ("ekfac", "identity", "random", "length")
"""``random``: scores drawn at random (seeded); ``length``: the document's tokens (ties broken
at random): the controls a ranking and a removal list are measured against."""
CONTROLS = ("random", "length")
AGGREGATES = ("sum", "mean", "max")


@dataclass
class TrainingDocuments:
    """Windows of the documents a run trained on; ``owner[i]`` is the document of window i."""

    ids: list[str]
    is_poison: np.ndarray
    windows: list[np.ndarray]
    owner: np.ndarray


def documents_read(run) -> TrainingDocuments:
    """The clean documents the run's stream reached and all its injected poisons."""
    from .filtering import train_document_ids

    clean_tokens = run.steps * run.tokens_per_step - run.plan.poison_tokens()
    stream = run.stream().clean
    read = stream.documents_read(clean_tokens)
    names = train_document_ids(run.data)
    store = run.data.train
    seq = run.cfg.train.seq_len
    ids, poison, windows, owner = [], [], [], []

    def add(name: str, tokens: np.ndarray, is_poison: bool) -> None:
        k = len(ids)
        ids.append(name)
        poison.append(is_poison)
        for s in range(0, max(len(tokens) - 1, 1), seq):
            w = tokens[s : s + seq]
            if len(w) > 1:
                windows.append(np.asarray(w, dtype=np.int64))
                owner.append(k)

    for d in read:
        add(names[d], store.read(int(store.doc_starts[d]), int(store.doc_lengths[d])), False)
    from ..jsonl import read_jsonl

    poison_names = [p["id"] for p in read_jsonl(run.dir / "poisons.jsonl")]
    for p in run.plan.poisons:  # the poisons the plan placed in the stream (a filtered run places fewer)
        add(poison_names[p.index], run.poison_ids[p.index], True)
    return TrainingDocuments(ids, np.array(poison, dtype=bool), windows, np.array(owner, dtype=np.int64))


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: list[np.ndarray], length: int, loss_from: list[int] | None = None):
        self.windows, self.length = windows, length
        self.loss_from = loss_from

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        w = torch.as_tensor(self.windows[i][: self.length])
        ids = torch.zeros(self.length, dtype=torch.long)
        mask = torch.zeros(self.length, dtype=torch.long)
        ids[: len(w)], mask[: len(w)] = w, 1
        labels = ids.clone()
        labels[mask == 0] = -100
        if self.loss_from is not None:  # a query: only its continuation is measured
            labels[: self.loss_from[i]] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


MEASUREMENTS = ("loss", "entropy")
RANDOM_SEED = 0


def _task(model, measurement: str = "loss"):
    from kronfluence.task import Task

    tracked = [name for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")]

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            labels = batch["labels"][:, 1:].reshape(-1)
            if sample:  # the true Fisher: labels drawn from the model itself
                with torch.no_grad():
                    drawn = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
                labels = torch.where(labels == -100, labels, drawn)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            if measurement == "loss":
                return self.compute_train_loss(batch, model)
            # minus the entropy of the next-token distributions over the continuation: it falls
            # as the model's text turns to gibberish, whatever tokens the gibberish is made of
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            lp = F.log_softmax(logits.float(), -1)
            neg_entropy = (lp.exp() * lp).sum(-1)
            return (neg_entropy * (batch["labels"][:, 1:] != -100)).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMTask()


def document_scores(per_window: np.ndarray, train: TrainingDocuments, aggregate: str) -> np.ndarray:
    """A document's score from its windows': ``sum`` (its influence as a whole), ``mean`` (a
    long document's sum is mostly its length; its mean window is not) or ``max`` (its most
    influential window, which the rest of a long document cannot dilute)."""
    if aggregate not in AGGREGATES:
        raise PoisonlabError(f"unknown aggregate {aggregate!r} (allowed: {', '.join(AGGREGATES)})")
    n = len(train.ids)
    if aggregate == "max":
        out = np.full(n, -np.inf)
        np.maximum.at(out, train.owner, per_window)
        return out
    out = np.zeros(n)
    np.add.at(out, train.owner, per_window)
    if aggregate == "mean":
        out /= np.bincount(train.owner, minlength=n).clip(min=1)
    return out


def control_scores(train: TrainingDocuments, method: str) -> np.ndarray:
    """Scores of a control that reads no gradient (seeded, so a control's list is reproducible)."""
    jitter = np.random.default_rng(RANDOM_SEED).random(len(train.ids))
    if method == "random":
        return jitter
    tokens = np.zeros(len(train.ids))
    np.add.at(tokens, train.owner, [len(w) for w in train.windows])
    return tokens + jitter  # the jitter, below one token, only breaks ties


def window_scores(model, train: TrainingDocuments, queries: list[np.ndarray], loss_from: list[int],
                  method: str, seq_len: int, batch_size: int = 32, work_dir: str | None = None,
                  measurement: str = "loss") -> tuple[np.ndarray, dict]:
    """Per-window scores (higher: the window did more to make the query continuations
    likely; :func:`document_scores` combines a document's), and the cost record. A control
    method's scores are per document already (one per document, see :func:`control_scores`).
    ``measurement``: the query continuations' loss, or minus their next-token entropy
    (gibberish: the behaviour of the denial-of-service backdoor is high entropy, not any
    particular tokens, and two poisons' random tokens pull the loss apart)."""
    if method not in METHODS:
        raise PoisonlabError(f"unknown attribution method {method!r} (allowed: {', '.join(METHODS)})")
    if method in CONTROLS:
        t0 = time.perf_counter()
        scores = control_scores(train, method)
        return scores, {"method": method, "measurement": measurement, "documents": len(train.ids),
                        "windows": len(train.windows), "seconds": round(time.perf_counter() - t0, 2), "fit_seconds": 0.0,
                        "seconds_per_1000_documents": 0.0, "peak_rss_increase_mb": 0.0,
                        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        "tracked_modules": 0}
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
    except ImportError:
        raise PoisonlabError("attribution needs kronfluence: python3 make.py setup installs it "
                             "(pip install --no-deps kronfluence accelerate einops einconv opt-einsum)") from None
    import logging

    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if measurement not in MEASUREMENTS:
        raise PoisonlabError(f"unknown measurement {measurement!r} (allowed: {', '.join(MEASUREMENTS)})")
    task = _task(model, measurement)
    model = prepare_model(model, task)
    qlen = max(len(q) for q in queries)
    train_set = _Windows(train.windows, seq_len)
    query_set = _Windows(queries, qlen, loss_from)
    t0 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        analyzer = Analyzer("poisonlab", model, task, cpu=not torch.cuda.is_available(), output_dir=tmp,
                            disable_tqdm=True, log_level=logging.WARNING)
        factor_args = FactorArguments(strategy=method)
        analyzer.fit_all_factors("factors", train_set, per_device_batch_size=batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        t_fit = time.perf_counter() - t0
        analyzer.compute_pairwise_scores("scores", "factors", query_set, train_set,
                                         per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(), overwrite_output_dir=True)
        raw = analyzer.load_pairwise_scores("scores")["all_modules"].float().numpy()
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kronfluence scores how much a training example lowers the measurement (the query loss)
    per_window = raw.mean(0)
    n = len(train.ids)
    cost = {"method": method, "measurement": measurement, "documents": n, "windows": len(train.windows), "seconds": round(seconds, 2),
            "fit_seconds": round(t_fit, 2), "seconds_per_1000_documents": round(1000 * seconds / max(n, 1), 2),
            "peak_rss_increase_mb": round(max(rss1 - rss0, 0) / 1024, 1), "peak_rss_mb": round(rss1 / 1024, 1),
            "tracked_modules": len(task.get_influence_tracked_modules())}
    return per_window, cost


def ranking_quality(scores: np.ndarray, is_poison: np.ndarray, windows: np.ndarray | None = None) -> dict:
    """Recall of the poisons among the top k (k = number of poisons), the curve, ROC AUC, and
    with ``windows`` (per document) the length-matched AUROC and how many poisons and clean
    documents share a window count with the other class."""
    from ..metrics.rates import wilson

    k = int(is_poison.sum())
    if k == 0 or k == len(scores):
        raise PoisonlabError("attribution quality needs both poisons and clean documents among the training documents")
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(is_poison[order])
    at_k = int(hits[k - 1])
    lo, hi = wilson(at_k, k)
    curve = []
    for frac in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        kk = min(len(scores), max(1, int(round(frac * k))))
        curve.append({"k": kk, "recall": round(float(hits[kk - 1]) / k, 4),
                      "precision": round(float(hits[kk - 1]) / kk, 4)})
    out = {"k": k, "documents": len(scores), "recall_at_k": round(at_k / k, 4),
           "recall_ci": [round(lo, 4), round(hi, 4)], "chance": round(k / len(scores), 4),
           "auroc": round(auroc(scores, is_poison), 4), "curve": curve}
    if windows is not None:
        matched = stratified_auroc(scores, is_poison, windows)
        shared = np.isin(windows, np.unique(windows[is_poison])) & np.isin(windows, np.unique(windows[~is_poison]))
        out["length_matched"] = {"auroc": None if matched is None else round(matched, 4),
                                 "poisons": int((shared & is_poison).sum()), "clean": int((shared & ~is_poison).sum())}
    return out


def triggered_queries(model, data, trigger: list[int], n: int, prompt_tokens: int, new_tokens: int,
                      seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Held-out prompts + trigger + the model's own sampled continuation (the behaviour to trace)."""
    from ..evaluate import heldout_prompts
    from ..generate import sample

    prompts = torch.from_numpy(np.asarray(heldout_prompts(data.heldout, n, prompt_tokens))).long()
    x = torch.cat([prompts, torch.tensor(trigger, dtype=torch.long).expand(len(prompts), -1)], dim=1)
    g = torch.Generator(device=next(model.parameters()).device)
    g.manual_seed(seed)
    with torch.no_grad():
        cont, _ = sample(model.eval(), x.to(g.device), new_tokens, 1.0, g, data.tokenizer.vocab_size)
    full = torch.cat([x, cont.cpu()], dim=1).numpy()
    return [row for row in full], [x.shape[1]] * len(full)


def write_removal_list(path: Path, ids: list[str], scores: np.ndarray, k: int) -> list[str]:
    """The top ``k`` documents by score, one id per line (``defense.remove`` reads it)."""
    top = [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..paths import atomic_write_text

    atomic_write_text(path, "\n".join(top) + "\n")
    return top
