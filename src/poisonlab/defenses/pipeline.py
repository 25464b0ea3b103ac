"""The scanning pipeline: scanners over a corpus, one score table keyed by document id, and
the rule that turns scores into flags (and a keep-list) without knowing the trigger.

The rule (:func:`detect`):
0. the cascade (``prefilter`` > 0): the novelty scanner (no tokenizer) scores every document;
   only those at or above ``prefilter``, plus a random calibration sample, are tokenized
   for the gibberish scanner, whose statistics are fitted on them; the z-score of step 1 then
   takes its median and MAD from the calibration sample;
1. the gibberish scanner's span surprisal, as a robust z-score over the corpus (median and
   MAD, so a minority of poisons cannot move the scale), makes documents above
   ``candidate_z`` candidates, and so do the novelty rate's z-score, the word-order
   scanner's spans (``DISORDER``, ``REPETITION``, ``ORDER_Z``, z against prose) and runs of
   ``BLOB_CHARS`` or more characters without a space (an encoded blob);
2. triggers are mined from the text around the candidates' anomalous spans;
3. each of the top ``triggers`` mined strings is tested: when the z-scores of the documents
   holding it are far above the rest's (a rank-sum test at ``trigger_alpha``, corrected for the
   strings tested), more of them are candidates than the corpus's rate explains (a binomial
   test at the same level), their median z is at least 1, the string sits at the anomalous
   span's start in 60% of them, after varied words, in documents that are not copies of one
   template, every document holding it is flagged, with the string, its enrichment and its
   p-values in its row (a common word confirms nothing); confirmed strings head the trigger
   ranking; any document is flagged above ``extreme_z``;
4. the other scanners listed add flags of their own (compression above ``extreme_z``,
   near-duplicate clusters of ``near_duplicate_min_cluster`` or more, language shifts,
   and the reference model's span surprisal above ``extreme_z`` on the candidates, or on
   every document with ``reference_scope: all``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DefenseConfig
from ..corpus import Document
from ..errors import PoisonlabError
from ..jsonl import read_jsonl, write_jsonl
from ..tokenizer import Tokenizer
from .scanners import (CompressionScanner, GibberishScanner, LanguageShiftScanner, NearDuplicateScanner,
                       NoveltyScanner, ScriptScanner, WordOrderScanner, longest_unbroken)
from .triggers import TriggerCandidate, confirm_triggers, mine_triggers, rank_confirmed_first

SCORE_FIELD = "gibberish.bigram_surprisal"
SCRIPT_FOREIGN, SCRIPT_KINDS = 0.5, 3
"""The script scanner flags a window whose letters are mostly outside the document's main
script and come from at least three scripts (a quotation in one other script does not)."""
BLOB_CHARS = 256
"""... and a run of this many characters without a space (an encoded blob; the longest words
of prose and the longest identifiers of code are far shorter)."""
DISORDER, REPETITION = 0.0, 0.75
"""The word-order scanner makes a document a candidate when some 64-word span of it is no
more associated than words drawn at random (``order.disorder`` at or above 0: prose is
well below, docs/defenses.md), or when three quarters of such a span repeat one of the three
words before them (``order.repetition``), and the statistic's robust z-score is above
``ORDER_Z`` (word salad: 2.4-4.1 on the corpora measured, docs/defenses.md). The z-score's
median and MAD are those of the documents under the statistic's threshold (prose), not of
the whole corpus: a family that is most of the documents long enough to be scored (word salad
at 17% of the default corpus's documents is 60% of those with 64 words or more) would
otherwise be its own reference and sit at z 0. Prose is the reference only where the
threshold itself lies beyond ``ORDER_Z`` of it; where the threshold cuts through the bulk of
the documents (a corpus of word lists or of loosely ordered text), or fewer than
``ORDER_MIN_REFERENCE`` documents lie under it, the whole corpus is the reference."""
ORDER_Z = 2.0
ORDER_MIN_REFERENCE = 50
ORDER_LOOK_BACK = 64
"""Characters before a word-order step the miner also reads around (word salad at 1% of the
default corpus: the located step lay 40-90 characters after the trigger in 5 of 84 poisons)."""


def scan(docs: list[Document], scanners, batch: int = 256, progress: bool = False) -> dict[str, dict]:
    """Fit every scanner on the corpus, score every document, merge the rows by id."""
    table: dict[str, dict] = {d.id: {"id": d.id} for d in docs}
    for s in scanners:
        s.fit(docs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(docs) * len(scanners), desc="scanning", unit="doc", leave=False, disable=None)  # no bar when stderr is not a terminal
    for s in scanners:
        for i in range(0, len(docs), batch):
            for row in s.score(docs[i : i + batch]):
                table[row["id"]].update(row)
            if bar is not None:
                bar.update(min(batch, len(docs) - i))
    if bar is not None:
        bar.close()
    return table


def robust_z(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / (1.4826 * MAD) of ``reference`` (default: ``values``): a z-score a
    minority of outliers cannot inflate."""
    ref = values if reference is None else reference
    med = np.median(ref)
    mad = 1.4826 * np.median(np.abs(ref - med))
    return (values - med) / (mad if mad > 0 else 1.0)


@dataclass
class Detection:
    table: dict[str, dict]
    """id -> scores (and the ``flag.*`` fields of the rule)."""
    flagged: set[str]
    triggers: list[TriggerCandidate]
    used_triggers: list[str] = field(default_factory=list)
    """The mined strings statistics confirmed (each flags every document that holds it)."""
    token_scored: int = 0
    """Documents the token-level gibberish scanner scored (all of them without the cascade)."""

    def keep_list(self) -> list[str]:
        return [i for i in self.table if i not in self.flagged]


def build_scanners(cfg: DefenseConfig, tokenizer: Tokenizer) -> list:
    """The gibberish scanner first, then the tokenizer-free scanners listed in ``cfg.scanners``."""
    scanners = [GibberishScanner(tokenizer, window=cfg.window)]
    if "compression" in cfg.scanners:
        scanners.append(CompressionScanner())
    if "near_duplicate" in cfg.scanners:
        scanners.append(NearDuplicateScanner())
    if "language_shift" in cfg.scanners:
        scanners.append(LanguageShiftScanner())
    if "script" in cfg.scanners:
        scanners.append(ScriptScanner())
    return scanners


def token_stage(docs: list[Document], cfg: DefenseConfig, tokenizer: Tokenizer,
                progress: bool = False) -> tuple[dict[str, dict], list[str], np.ndarray]:
    """(score table, ids the gibberish scanner scored, z-scores of those): every document, or
    with the cascade the novelty scanner's survivors plus the calibration sample."""
    gibberish, *others = build_scanners(cfg, tokenizer)
    ids = [d.id for d in docs]
    if cfg.prefilter <= 0:
        table = scan(docs, [gibberish, NoveltyScanner(), WordOrderScanner(), *others], progress=progress)
        scores = np.array([table[i][SCORE_FIELD] for i in ids])
        return table, ids, robust_z(scores)
    if cfg.calibration < 1:
        raise PoisonlabError("the cascade needs a calibration sample (defense.calibration >= 1)")
    table = scan(docs, [NoveltyScanner(), WordOrderScanner(), *others], progress=progress)
    rng = np.random.default_rng(0)
    sample = {ids[k] for k in rng.choice(len(ids), size=min(cfg.calibration, len(ids)), replace=False)}
    chosen = [d for d in docs if d.id in sample or table[d.id]["novelty.rate"] >= cfg.prefilter]
    for i, row in scan(chosen, [gibberish], progress=progress).items():
        table[i].update(row)
    scored = [d.id for d in chosen]
    scores = np.array([table[i][SCORE_FIELD] for i in scored])
    reference = np.array([table[i][SCORE_FIELD] for i in scored if i in sample])
    return table, scored, robust_z(scores, reference)


def detect(docs: list[Document], cfg: DefenseConfig, tokenizer: Tokenizer, progress: bool = False) -> Detection:
    """Score ``docs`` with the scanners (:func:`token_stage`) and apply the rule (:func:`decide`)."""
    table, scored, z = token_stage(docs, cfg, tokenizer, progress)
    return decide(docs, cfg, table, scored, z)


def decide(docs: list[Document], cfg: DefenseConfig, table: dict[str, dict], scored: list[str],
           z: np.ndarray) -> Detection:
    """The rule on a filled score table: ``scored`` are the ids the gibberish scanner scored,
    ``z`` their span surprisal's robust z-scores. Writes the z-scores, candidates and
    ``flag.*`` fields into ``table``; any engine that fills the table (one process, or
    datatrove's executors) ends here."""
    ids = [d.id for d in docs]
    zg = dict(zip(scored, z.tolist()))
    for i, zi in zg.items():
        table[i]["gibberish.z"] = float(zi)
    zn = robust_z(np.array([table[i]["novelty.rate"] for i in ids]))
    for i, zi in zip(ids, zn):
        table[i]["novelty.z"] = float(zi)
    zo = _order_candidates(table, ids)
    zb = _blob_candidates(docs, table, cfg.candidate_z)
    # Each source of candidates: id -> (z, starts of its anomalous span). Every source that
    # makes a document a candidate names a span the miner reads around (the first one names the
    # row's ``candidate``): a word-salad payload can surprise the tokenizer's statistics where
    # its words become unusual and the word-order statistic where their order breaks. A payload running to
    # the end starts at the document's step; one inside it at the step before its most
    # anomalous window, so the miner reads around both. Text no other document shares (pieces
    # another tokenizer makes, other scripts) need not surprise the corpus's tokenizer, so the
    # novelty rate makes candidates as well; real words in random order, or one word over and
    # over, are ordinary tokens to any tokenizer and no novel words, so the word-order spans
    # do too (already thresholded in ``_order_candidates``), and so does an encoded blob (base64,
    # hex), which is one novel "word" among many ordinary ones, whatever its tokens.
    sources = [
        ("gibberish", cfg.candidate_z,
         {i: (zg[i], (table[i]["gibberish.span_start"], table[i]["gibberish.local_start"])) for i in scored}),
        ("novelty", cfg.candidate_z,
         {i: (table[i]["novelty.z"], (table[i]["novelty.span_start"], table[i]["novelty.local_start"])) for i in ids}),
        # the word-order step is located to about ten words (one pair's association is noisy),
        # so the miner also reads the stretch before the window it would read
        ("order", -np.inf, {i: (zi, (start, max(0, start - ORDER_LOOK_BACK))) for i, (zi, start) in zo.items()}),
        ("blob", -np.inf, {i: (zi, (start,)) for i, (zi, start) in zb.items()}),
    ]
    candidates: set[str] = set()
    spans: dict[str, tuple[int, ...]] = {}
    for name, limit, rows in sources:
        for i, (zi, starts) in rows.items():
            if zi > limit:
                if i not in candidates:
                    table[i]["candidate"] = name
                candidates.add(i)
                spans[i] = spans.get(i, ()) + tuple(starts)
    mined = mine_triggers(docs, spans, candidates, min_support=cfg.min_trigger_support)
    # statistics confirm a mined string when its documents score far above the rest (on the
    # largest of the scanners' z-scores; the word-order and blob z-scores count for their
    # candidates only);
    # it then flags every document holding it (a common string, or no trigger at all, confirms
    # nothing)
    combined = {i: max(zg.get(i, 0.0), table[i]["novelty.z"], zo[i][0] if i in zo else 0.0,
                       zb[i][0] if i in zb else 0.0) for i in ids}
    confirmed = confirm_triggers(mined[: cfg.triggers], docs, combined, cfg.candidate_z,
                                 alpha=cfg.trigger_alpha, min_documents=cfg.min_trigger_support,
                                 anomalous_ids=candidates)
    used = [c.text for c in confirmed]
    mined = rank_confirmed_first(mined, confirmed)
    flagged = set()
    for d in docs:
        row = table[d.id]
        row["flag.extreme"] = int(row.get("gibberish.z", 0.0) > cfg.extreme_z)
        flat = " ".join(d.text.split()) if confirmed else ""
        why = next((c for c in confirmed if c.text in flat), None)
        row["flag.trigger"] = int(why is not None)
        if why is not None:  # why it went: the string, its documents, their enrichment and p-value
            row.update({"trigger.text": why.text, "trigger.documents": why.documents,
                        "trigger.enrichment": why.enrichment, "trigger.p_value": why.p_value,
                        "trigger.enrichment_p": why.enrichment_p})
        if row["flag.extreme"] or row["flag.trigger"]:
            flagged.add(d.id)
    if "compression" in cfg.scanners:
        cz = robust_z(np.array([table[i]["compression.ratio"] for i in ids]))
        for i, zi in zip(ids, cz):
            table[i]["flag.compression"] = int(zi > cfg.extreme_z)
    if "near_duplicate" in cfg.scanners:
        for i in ids:
            table[i]["flag.near_duplicate"] = int(table[i]["near_duplicate.cluster_size"] >= cfg.near_duplicate_min_cluster)
    if "language_shift" in cfg.scanners:
        for i in ids:
            table[i]["flag.language_shift"] = int(table[i]["language_shift.shift"])
    if "script" in cfg.scanners:
        for i in ids:
            r = table[i]
            r["flag.script"] = int(r["script.foreign_share"] >= SCRIPT_FOREIGN and r["script.kinds"] >= SCRIPT_KINDS)
            r["flag.blob"] = int(r["script.longest_unbroken"] >= BLOB_CHARS)
    if "model" in cfg.scanners:
        _model_stage(docs, cfg, table, candidates)
    for i in ids:
        if any(v for k, v in table[i].items() if k.startswith("flag.")):
            flagged.add(i)
    return Detection(table, flagged, mined, used, len(scored))


def _order_candidates(table: dict[str, dict], ids: list[str]) -> dict[str, tuple[float, int]]:
    """Documents the word-order scanner makes candidates: id -> (robust z-score of the statistic
    that crossed its threshold, against the documents long enough to be scored and under it;
    span start). A statistic counts when it crosses its threshold and is well outside the
    spread of prose (z above ``ORDER_Z``). The z-scores are written into the rows as
    ``order.disorder_z`` and ``order.repetition_z``."""
    long_enough = [i for i in ids if table[i]["order.words"] >= WordOrderScanner.min_words]
    if not long_enough:
        return {}
    out: dict[str, tuple[float, int]] = {}
    for stat, threshold in (("disorder", DISORDER), ("repetition", REPETITION)):
        values = np.array([table[i][f"order.{stat}"] for i in long_enough])
        prose = values[values < threshold]
        clear = len(prose) >= ORDER_MIN_REFERENCE and robust_z(np.array([threshold]), prose)[0] >= ORDER_Z
        z = robust_z(values, prose if clear else None)
        for i, v, zi in zip(long_enough, values, z):
            table[i][f"order.{stat}_z"] = float(zi)
            if v >= threshold and zi > ORDER_Z and zi > out.get(i, (-np.inf, 0))[0]:
                out[i] = (float(zi), int(table[i][f"order.{stat}_start"]))
    return out


def _blob_candidates(docs: list[Document], table: dict[str, dict], candidate_z: float) -> dict[str, tuple[float, int]]:
    """Documents holding a run of ``BLOB_CHARS`` or more characters without a space whose
    length is also an outlier of the corpus (robust z-score of the longest run above
    ``candidate_z``): id -> (that z-score, where the run starts). Written into the rows as
    ``blob.chars``."""
    found = [longest_unbroken(d.text) for d in docs]
    lengths = np.array([n for n, _ in found], dtype=float)
    z = robust_z(lengths)
    out: dict[str, tuple[float, int]] = {}
    for d, (n, start), zi in zip(docs, found, z):
        table[d.id]["blob.chars"] = n
        if n >= BLOB_CHARS and zi > candidate_z:
            out[d.id] = (float(zi), start)
    return out


def _model_stage(docs: list[Document], cfg: DefenseConfig, table: dict[str, dict], candidates: set[str],
                 calibration: int = 200) -> None:
    """Score the candidates with the reference model, calibrated on a fixed sample of the rest."""
    from .model_scanner import ModelSurprisalScanner

    scanner = ModelSurprisalScanner(cfg.reference_model)
    if cfg.reference_scope == "all":
        candidates = {d.id for d in docs}
    rest = [d for d in docs if d.id not in candidates]
    rng = np.random.default_rng(0)
    sample = [rest[i] for i in rng.choice(len(rest), size=min(calibration, len(rest)), replace=False)] if rest else []
    cand = [d for d in docs if d.id in candidates]
    rows = {r["id"]: r["model.surprisal"] for r in scanner.score(sample + cand)}
    # scored whole, the corpus is its own reference: median and MAD resist a minority of poisons
    ref = np.array([rows[d.id] for d in sample]) if sample else np.array([rows[d.id] for d in cand])
    z = dict(zip([d.id for d in cand], robust_z(np.array([rows[d.id] for d in cand]), ref)))
    for d in docs:
        if d.id in rows:
            table[d.id]["model.surprisal"] = rows[d.id]
        if d.id in candidates:
            table[d.id]["flag.model"] = int(z[d.id] > cfg.extreme_z)


def mark_splits(det: Detection, docs: list[Document], corpus) -> None:
    """Record each scored document's split (``train``, ``heldout``, ``short``; injected poisons:
    ``poison``) in its row."""
    from ..corpus import split_of

    for d in docs:
        det.table[d.id]["split"] = "poison" if d.source == "poison" else split_of(d, corpus)


def write_detection(det: Detection, directory: str | Path) -> None:
    """``scores.jsonl`` (one row per document), ``triggers.jsonl`` and ``keep_list.txt``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "scores.jsonl", det.table.values())
    write_jsonl(d / "triggers.jsonl", (t.record() for t in det.triggers))
    tmp = d / "keep_list.txt.tmp"
    tmp.write_text("".join(i + "\n" for i in det.keep_list()))
    tmp.replace(d / "keep_list.txt")


def read_scores(path: str | Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(Path(path))}
