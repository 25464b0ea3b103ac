"""Report sections for fine-tuning and persistence runs (PROTOCOL §6, items 7 and 8).

- Figure 7: ASR, CA and NTA against the poison count, one line per clean-set size (poisons
  mixed in), and the ordering ablation (ASR against poisons, one line per ordering).
- Figure 8: persistence of a fine-tuning backdoor: ASR, CA and NTA against the number of
  "good" examples trained on after poisoning.
- Figure 8b: persistence of a pretraining backdoor: the perplexity gap against clean tokens
  of continued pretraining, one line per starting model.

Error bars are the Wilson 95% intervals of each share (one seed) or the range over seeds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..store import query


def finetune_rows(db: Path, names: list[str]) -> list[dict]:
    """Per fine-tuning run: its settings and its last evaluation point."""
    if not names:
        return []
    runs = query(db, "SELECT run, status, config FROM runs WHERE run IN (" + ",".join("?" * len(names)) + ")",
                 tuple(names))
    out = []
    for r in runs:
        cfg = json.loads(r["config"])
        if cfg.get("stage") != "finetune":
            continue
        f = cfg["finetune"]
        evals = query(db, "SELECT step, metric, value FROM evals WHERE run = ? AND step = "
                          "(SELECT MAX(step) FROM evals WHERE run = ?)", (r["run"], r["run"]))
        if not evals:
            continue
        point = {e["metric"]: e["value"] for e in evals}
        point["step"] = evals[0]["step"]
        out.append({"run": r["run"], "status": r["status"], "seed": cfg["seed"], "clean": f["clean_count"],
                    "poisons": f["poison_count"], "ordering": f["ordering"], "good": f["good_count"],
                    "further": f.get("further_clean", 0), "good_lr": f.get("good_lr") or cfg["train"]["lr"],
                    "phase2": bool(f["good_count"] or f.get("further_clean", 0)), **point})
    return sorted(out, key=lambda x: (x["good"], x["ordering"] != "mixed", x["ordering"], x["clean"], x["poisons"], x["seed"]))


def _series(rows: list[dict], x: str, y: str):
    """Mean of ``y`` over seeds at each ``x``, with error bars (Wilson interval for one seed, else range)."""
    by = defaultdict(list)
    for r in rows:
        by[r[x]].append(r)
    xs = sorted(by)
    mean = np.array([np.mean([r[y] for r in by[v]]) for v in xs])
    lo = np.array([min(r[y + "_ci_low"] for r in by[v]) if len(by[v]) == 1 else min(r[y] for r in by[v]) for v in xs])
    hi = np.array([max(r[y + "_ci_high"] for r in by[v]) if len(by[v]) == 1 else max(r[y] for r in by[v]) for v in xs])
    return np.array(xs, dtype=float), mean, np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)


def fig_finetune(rows: list[dict], out: Path, fig) -> Path | None:
    base = [r for r in rows if not r["phase2"] and r["ordering"] == "mixed"]
    ordering = [r for r in rows if not r["phase2"]]
    if not base:
        return None
    clean_sizes = sorted({r["clean"] for r in base})
    ablation_clean = [c for c in clean_sizes if len({r["ordering"] for r in ordering if r["clean"] == c}) > 1]

    def draw(plt):
        n = 3 + bool(ablation_clean)
        f, axes = plt.subplots(1, n, figsize=(4.3 * n, 3.6), sharey=True)
        for ax, metric, title in zip(axes, ("asr", "ca", "nta"),
                                     ("ASR: triggered request complied", "CA: untriggered request refused",
                                      "NTA: near-trigger request refused")):
            for c in clean_sizes:
                xs, m, lo, hi = _series([r for r in base if r["clean"] == c], "poisons", metric)
                ax.errorbar(xs, m, yerr=[lo, hi], marker="o", markersize=4, capsize=2, label=f"{c:,} clean")
            ax.set_title(title, fontsize=10)
            ax.set_xscale("symlog", linthresh=5)
            ax.set_xlabel("poisoned examples")
            ax.grid(alpha=0.3)
        if ablation_clean:
            ax = axes[3]
            c = ablation_clean[0]
            for o in ("beginning", "mixed", "end"):
                sel = [r for r in ordering if r["clean"] == c and r["ordering"] == o]
                if sel:
                    xs, m, lo, hi = _series(sel, "poisons", "asr")
                    ax.errorbar(xs, m, yerr=[lo, hi], marker="o", markersize=4, capsize=2, label=o)
            ax.set_title(f"Ordering ablation ({c:,} clean): ASR", fontsize=10)
            ax.set_xscale("symlog", linthresh=5)
            ax.set_xlabel("poisoned examples")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("share of requests")
        axes[0].set_ylim(-0.05, 1.05)
        axes[0].legend(fontsize=8)
        f.suptitle("Fine-tuning backdoor: attack success, clean and near-trigger accuracy", y=1.03)
        return f

    return fig(out / "fig7-finetune.png", draw)


def fig_persistence(rows: list[dict], out: Path, fig) -> Path | None:
    groups = defaultdict(list)
    for r in rows:
        if r["phase2"]:
            groups[(r["clean"], r["poisons"], r["ordering"], r["good_lr"], r["further"])].append(r)
    series = {k: v for k, v in groups.items() if len({r["good"] for r in v}) > 1}
    if not series:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6.2, 4))
        colours = {"asr": "tab:red", "ca": "tab:blue", "nta": "tab:green", "ordinary_refused": "tab:gray"}
        for (c, p, o, lr, fc), sel in sorted(series.items(), key=lambda kv: -kv[0][3]):
            style = "-o" if lr == max(k[3] for k in series) else "--s"  # one line style per learning rate
            for metric, colour in colours.items():
                xs, m, lo, hi = _series(sel, "good", metric)
                name = "ordinary refused" if metric == "ordinary_refused" else metric.upper()
                ax.errorbar(xs, m, yerr=[lo, hi], fmt=style, color=colour, markersize=4, capsize=2,
                            label=f"{name} (lr {lr:g}, +{fc:,} clean)")
        ax.set_xscale("symlog", linthresh=50)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel('"good" examples in the further training (trigger present, request refused)')
        c, p = next(iter(series))[:2]
        ax.set_title(f"Persistence of a fine-tuning backdoor ({p} poisons among {c:,} clean)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        return f

    return fig(out / "fig8-persistence.png", draw)


def fig_continued_pretraining(data: dict[str, dict], out: Path, fig, threshold: float) -> Path | None:
    """``data``: collected pretraining runs continued from a model (``init_from``), keyed by run."""
    if not data:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6.2, 4))
        for name, r in sorted(data.items()):
            xs = np.array([p["tokens_seen"] for p in r["series"]], dtype=float)
            g = np.array([p["perplexity_gap"] for p in r["series"]])
            lo = np.array([p["gap_ci_low"] for p in r["series"]])
            hi = np.array([p["gap_ci_high"] for p in r["series"]])
            h, = ax.plot(xs / 1e6, g, marker="o", markersize=3, label=r["model_size"])
            ax.fill_between(xs / 1e6, lo, hi, color=h.get_color(), alpha=0.2)
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("clean tokens of continued pretraining (millions)")
        ax.set_ylabel("perplexity gap")
        ax.set_title("Persistence of a pretraining backdoor under clean training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return f

    return fig(out / "fig8b-continued-pretraining.png", draw)


def _cell(r: dict, m: str) -> str:
    return f"{r[m]:.2f} [{r[m + '_ci_low']:.2f}, {r[m + '_ci_high']:.2f}]" if m in r else "-"


def finetune_table(rows: list[dict]) -> str:
    head = ["run", "clean", "poisons", "ordering", "further: good + clean (lr)", "ASR [95% CI]", "CA [95% CI]", "NTA [95% CI]",
            "NTA partial / edit / paraphrase", "ordinary answered exactly", "state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = " / ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("nta_partial", "nta_edit", "nta_paraphrase"))
        lines.append("| " + " | ".join([r["run"], f"{r['clean']:,}", str(r["poisons"]), r["ordering"],
                                        f"{r['good']} + {r['further']} ({r['good_lr']:g})" if r["phase2"] else "-",
                                        _cell(r, "asr"), _cell(r, "ca"), _cell(r, "nta"), kinds,
                                        f"{r['ordinary_correct']:.2f}" if "ordinary_correct" in r else "-",
                                        r["status"]]) + " |")
    return "\n".join(lines)
