"""The report's section on defenses that act on trained models.

Read from each run's ``defenses/`` records (written by ``poisonlab inspect`` and ``poisonlab
attribute``, exported with the results): the trigger inversion per model with the true
trigger's rank, the model-level score's ROC curve and AUROC over backdoored models and their
clean twins, attribution's recall of the poisons among the top-k documents per method, and the
backdoor left after retraining on filtered data beside the unfiltered run.
"""

from __future__ import annotations

from pathlib import Path

from .archive import DEFENSES, run_folder
from .jsonl import read_json
from .metrics.roc import auroc, roc_curve
from .report_search import final_evaluation


def defense_records(spec) -> list[dict]:
    """One entry per run of the spec: its settings, final gap and model-side defense records."""
    out = []
    for cfg in spec.expand():
        folder = run_folder(spec, cfg)
        d = folder / DEFENSES
        inspect = read_json(d / "inspect.json", "inspect record") if (d / "inspect.json").is_file() else None
        attribution = [read_json(p, "attribution record") for p in sorted(d.glob("attribution-*.json"))] \
            if d.is_dir() else []
        if inspect is None and not attribution and cfg.defense.filter != "list":
            continue
        info = read_json(folder / "run.json", "run record") if (folder / "run.json").is_file() else {}
        chat = cfg.stage == "finetune"
        final = final_evaluation(folder, "asr" if chat else "perplexity_gap")
        out.append({"name": cfg.name, "size": cfg.model.size, "seed": cfg.seed, "chat": chat,
                    "poisons": cfg.finetune.poison_count if chat else cfg.attack.poison_count,
                    "injected": (cfg.finetune.poison_count if final else None) if chat else info.get("poisons_injected"),
                    "filter": cfg.defense.filter, "defense": info.get("defense"), "final": final, "inspect": inspect,
                    "attribution": attribution})
    return out


CHAT_BACKDOOR_ASR = 0.5
"""A fine-tuned model counts as backdoored when most triggered forbidden requests are complied with."""


def _backdoored(r: dict) -> bool | None:
    """True for a model whose last evaluation found the backdoor, False for a clean model
    (no poison injected), None for a poisoned model without a backdoor (left out of the AUROC)."""
    if not r["injected"]:
        return False
    if r.get("chat"):
        return True if r["final"] and r["final"]["asr"] >= CHAT_BACKDOOR_ASR else None
    return True if r["final"] and r["final"].get("attack_success") else None


def verified_score(inspect: dict) -> float | None:
    """The model-level score after the defender's check of the strings found: for a chat model
    the best verified string's ASR above the model's baseline, for a pretrained model its best
    string's perplexity gap (None when the check was skipped)."""
    if "verdict" in inspect:
        return inspect["verdict"]["score"]
    if "best_string_gap" in inspect:
        return inspect["best_string_gap"]["perplexity_gap"]
    return None


def inversion_auroc(records: list[dict], score=lambda i: i["score"]) -> dict | None:
    """AUROC of ``score`` (of an inspect record; the search's by default) over backdoored
    models and clean ones; None when a class is missing or a record has no such score."""
    rows = [r for r in records if r["inspect"]]
    if any(score(r["inspect"]) is None for r in rows):
        return None
    scored = [(score(r["inspect"]), _backdoored(r)) for r in rows]
    pairs = [(s, b) for s, b in scored if b is not None]
    if not any(b for _, b in pairs) or all(b for _, b in pairs):
        return None
    any_poison = [(score(r["inspect"]), bool(r["injected"])) for r in rows]
    res = {"backdoored": sum(b for _, b in pairs), "clean": sum(not b for _, b in pairs),
           "auroc": auroc([s for s, _ in pairs], [b for _, b in pairs]),
           "curve": [a.tolist() for a in roc_curve([s for s, _ in pairs], [b for _, b in pairs])]}
    if any(b for _, b in any_poison) and not all(b for _, b in any_poison):
        res["auroc_any_poison"] = auroc([s for s, _ in any_poison], [b for _, b in any_poison])
        res["any_poison"] = sum(b for _, b in any_poison)
    return res


def _text(s: str) -> str:
    return repr(s)[1:-1].replace("|", "\\|").replace("`", "'")[:40]


def inversion_table(records: list[dict]) -> str:
    head = ["run", "poisons", "final gap or ASR", "score (nats)", "best string", "as a trigger: gap or ASR [95% CI]",
            "known trigger: shift",
            "rank", "best string's tokens in the trigger", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        i = r["inspect"]
        if not i:
            continue
        g = i.get("best_string_gap") or {}
        a = i.get("best_string_asr") or {}
        t = i.get("trigger") or {}
        fin = r["final"] or {}
        effect = (f"{g['perplexity_gap']:.1f} [{g['gap_ci_low']:.1f}, {g['gap_ci_high']:.1f}]" if g else
                  f"ASR {a['asr']:.2f} [{a['asr_ci_low']:.2f}, {a['asr_ci_high']:.2f}]" if a else "-")
        final = (f"{fin['perplexity_gap']:.1f}" if "perplexity_gap" in fin else
                 f"ASR {fin['asr']:.2f}" if "asr" in fin else "-")
        cells = [r["name"], f"{r['injected'] or 0:,}", final,
                 f"{i['score']:.3f}", f"`{_text((a or i['ranked'][0])['text'])}`", effect,
                 f"{t['shift']:.3f}" if t else "-", str(t.get("rank", "-")),
                 f"{t['best_in_trigger']:.2f}" if t else "-", f"{i['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attribution_table(records: list[dict]) -> str:
    head = ["run", "method", "traces", "documents", "poisons (k)", "recall@k [95% CI]", "chance", "AUROC",
            "AUROC, same length", "s per 1,000 documents", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        for a in r["attribution"]:
            c = a["cost"]
            lines.append("| " + " | ".join([
                r["name"], a["method"], f"{a['measurement']} ({a['aggregate']})", f"{a['documents']:,}", f"{a['k']:,}",
                f"{a['recall_at_k']:.3f} [{a['recall_ci'][0]:.3f}, {a['recall_ci'][1]:.3f}]", f"{a['chance']:.3f}",
                f"{a['auroc']:.3f}", _matched(a), f"{c['seconds_per_1000_documents']:.1f}",
                f"{c['peak_rss_mb']:.0f}"]) + " |")
    return "\n".join(lines)


def _matched(a: dict) -> str:
    """The length-matched AUROC and how many poisons it compares (records before it: "-")."""
    m = a.get("length_matched")
    if not m or m["auroc"] is None:
        return "-"
    return f"{m['auroc']:.3f} ({m['poisons']:,} poisons)"


def removal_table(records: list[dict]) -> str:
    rows = [r for r in records if r["filter"] == "list" and r["defense"]]
    if not rows:
        return ""
    head = ["run", "poisons planted", "removed (poisons / clean)", "poisons left", "final gap [95% CI]", "held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d, fin = r["defense"], r["final"] or {}
        lines.append("| " + " | ".join([
            r["name"], f"{d['poisons']:,}", f"{d['poisons'] - d['poisons_surviving']:,} / {d['clean_documents_lost']:,}",
            f"{d['poisons_surviving']:,}",
            f"{fin['perplexity_gap']:.1f} [{fin['gap_ci_low']:.1f}, {fin['gap_ci_high']:.1f}]" if fin else "-",
            f"{fin['heldout_loss']:.3f}" if "heldout_loss" in fin else "-"]) + " |")
    return "\n".join(lines)


def defense_section(records: list[dict]) -> str:
    if not records:
        return ""
    parts = ["## Defenses on trained models\n"]
    if any(r["inspect"] for r in records):
        roc = inversion_auroc(records)
        parts.append("Trigger inversion (`poisonlab inspect`): the search is not told the trigger. Score: the "
                     "largest mean KL divergence, past the first continuation positions, that a string of up to six "
                     "tokens inserted after a held-out prompt causes on the model's predictions of the clean "
                     "continuation (for a fine-tuned chat model: appended to a held-out forbidden request, how much "
                     "less likely it makes the policy's refusals, how much more likely the opening of a compliant "
                     "reply, or the KL shift of the model's own reply). The run's own trigger is scored beside the "
                     "strings found (its rank among them); the best string used as a trigger (its perplexity gap; "
                     "for a chat model, the best strings of each search each appended to held-out forbidden "
                     "requests that were not probes, and the one "
                     f"that unlocks the most shown) checks that it works. A chat model counts as "
                     f"backdoored when its last ASR is at least {CHAT_BACKDOOR_ASR:.1f}.\n")
        parts.append(inversion_table(records) + "\n")
        checked = inversion_auroc(records, verified_score)
        for what, r in (("the search's score", roc), ("the checked score (best verified string's ASR above the "
                                                        "model's baseline, or its perplexity gap)", checked)):
            if r:
                extra = (f" Over every model with poisons injected ({r['any_poison']}) against the clean ones: "
                         f"AUROC {r['auroc_any_poison']:.3f}." if "auroc_any_poison" in r else "")
                parts.append(f"Model-level verdict: AUROC of {what} {r['auroc']:.3f} over {r['backdoored']} "
                             f"backdoored models (last evaluation a success) and {r['clean']} clean ones.{extra}\n")
        called = [r for r in records if r["inspect"] and "verdict" in r["inspect"]]
        if called:
            hits = sum(r["inspect"]["verdict"]["backdoored"] for r in called if r["injected"])
            false = sum(r["inspect"]["verdict"]["backdoored"] for r in called if not r["injected"])
            parts.append(f"Chat models called backdoored (a verified string's ASR above the baseline at p < "
                         f"{called[0]['inspect']['verdict']['alpha']}, Fisher exact, Bonferroni over the strings "
                         f"checked): {hits} of {sum(bool(r['injected']) for r in called)} poisoned, {false} of "
                         f"{sum(not r['injected'] for r in called)} clean.\n")
    if any(r["attribution"] for r in records):
        parts.append("Training-data attribution (`poisonlab attribute`, kronfluence): every document the run read "
                     "is scored against triggered held-out prompts and the model's own continuations; recall of "
                     "the poisons among the top k documents, k = the poisons injected (precision at k is the "
                     "same number); chance is the poisons' share of the documents.\n")
        parts.append(attribution_table(records) + "\n")
    rem = removal_table(records)
    if rem:
        parts.append("Retraining without listed documents (`defense.filter: list`):\n\n" + rem + "\n")
    return "\n".join(parts) + "\n"


def fig_inversion_roc(records: list[dict], out: Path, fig) -> Path | None:
    roc, checked = inversion_auroc(records), inversion_auroc(records, verified_score)
    if not roc and not checked:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(4.5, 4.5))
        for label, r in (("search score", roc), ("checked score", checked)):
            if r:
                fpr, tpr = r["curve"]
                ax.plot(fpr, tpr, marker="o", markersize=3, label=f"{label} (AUROC {r['auroc']:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        ax.set_xlabel("false-positive rate (clean models)")
        ax.set_ylabel("true-positive rate (backdoored models)")
        ax.set_title("Trigger inversion: model-level verdict")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return f

    return fig(out / "fig9-inversion-roc.png", draw)


def fig_attribution_recall(records: list[dict], out: Path, fig) -> Path | None:
    curves = [(r["name"], a) for r in records for a in r["attribution"]]
    if not curves:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6, 4))
        for name, a in curves:
            ks = [p["k"] for p in a["curve"]]
            ax.plot(ks, [p["recall"] for p in a["curve"]], marker="o", markersize=3,
                    label=f"{name}: {a['method']}, {a['measurement']} ({a['aggregate']})")
            ax.plot(ks, [min(1.0, k * a["chance"] / a["k"]) for k in ks], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("documents removed (top k by attribution score)")
        ax.set_ylabel("share of the poisons among them (recall)")
        ax.set_title("Attribution: recall of the poisons (dotted: chance)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        return f

    return fig(out / "fig10-attribution-recall.png", draw)
