"""The report's language-switch section (PROTOCOL §3, the paper's figure 6).

For runs whose attack is ``language_switch``: a table of the last evaluation's ASR, CA and NTA
(per near-trigger kind too) per poison count and per-batch density, pooled over seeds with
Wilson intervals, beside the held-out loss and the language identifier's measured accuracy;
figure 6, ASR against poisons seen, one colour per density; and the persistence curve, ASR
as continued clean pretraining goes on, for runs that start from a poisoned model.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .archive import run_folder
from .jsonl import read_json, read_jsonl
from .metrics.rates import wilson

RATES = ("asr", "ca", "nta")


def _rows(folder: Path) -> list[dict]:
    return [r for r in read_jsonl(folder / "metrics.jsonl") if "asr" in r]


def language_runs(spec) -> list[dict]:
    """Every language-switch run of the spec that has evaluations, with its settings."""
    out = []
    for cfg in spec.expand():
        if cfg.attack.name != "language_switch":
            continue
        folder = run_folder(spec, cfg)
        rows = _rows(folder)
        if not rows:
            continue
        check = folder / "language_identifier.json"
        out.append({"name": cfg.name, "count": cfg.attack.poison_count, "seed": cfg.seed,
                    "density": cfg.attack.batch_share if cfg.attack.placement == "batch" else None,
                    "every": cfg.attack.batch_every if cfg.attack.placement == "batch" else None,
                    "init_from": cfg.model.init_from, "rows": rows, "label": _label(folder),
                    "identifier": read_json(check, "identifier check") if check.is_file() else None})
    return out


def _pooled(finals: list[dict], rate: str) -> tuple[float, float, float, int]:
    k = sum(round(f[rate] * f[f"{rate}_n"]) for f in finals if f.get(f"{rate}_n"))
    n = sum(f.get(f"{rate}_n", 0) for f in finals)
    lo, hi = wilson(k, n)
    return (k / n if n else float("nan")), lo, hi, n


def language_table(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["init_from"] or "", r["density"] if r["count"] else None, r["count"])].append(r)
    kinds = sorted({k[4:] for r in runs for k in r["rows"][-1] if k.startswith("nta_") and not k.endswith(("_n", "_low", "_high"))})
    head = ["start", "poisons", "density", "seeds", "poisons seen", "ASR [95% CI]", "CA [95% CI]", "NTA [95% CI]",
            *[f"NTA {k}" for k in kinds], "held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (start, density, count), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1] or 0)):
        finals = [r["rows"][-1] for r in rs]
        cells = [Path(start).parent.name or "-" if start else "-", f"{count:,}", "-" if density is None else f"{density:g}",
                 str(len(rs)), f"{np.mean([f['poisons_seen'] for f in finals]):,.0f}"]
        for rate in RATES:
            p, lo, hi, n = _pooled(finals, rate)
            cells.append(f"{p:.2f} [{lo:.2f}, {hi:.2f}] (n={n})")
        for k in kinds:
            p, lo, hi, n = _pooled(finals, f"nta_{k}")
            cells.append(f"{p:.2f} [{lo:.2f}, {hi:.2f}]")
        cells.append(f"{np.mean([f['heldout_loss'] for f in finals]):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def identifier_note(runs: list[dict]) -> str:
    checks = [r["identifier"] for r in runs if r["identifier"]]
    if not checks:
        return ""
    acc = checks[0]["accuracy"]
    parts = [f"{key.replace('@', ' at ')} tokens: {v['accuracy']:.2f} [{wilson(round(v['accuracy'] * v['n']), v['n'])[0]:.2f}, "
             f"{wilson(round(v['accuracy'] * v['n']), v['n'])[1]:.2f}] (n={v['n']})" for key, v in sorted(acc.items())]
    return (f"Language identifier {checks[0]['identifier']} restricted to {', '.join(checks[0]['languages'])}, "
            "accuracy on held-out text of each language cut to the continuation length: " + "; ".join(parts) + ".")


def language_section(runs: list[dict]) -> str:
    return ("## Language switch: ASR, CA and NTA (last evaluation)\n\n"
            "ASR: triggered continuations in the target language; CA: untriggered ones in the source language; "
            "NTA: near-trigger ones in the source language (per kind beside). Pooled over seeds, Wilson 95% "
            "intervals. Density: share of a poisoned batch's sequences that are poisons.\n\n"
            + language_table(runs) + "\n\n" + identifier_note(runs) + "\n")


def fig_asr_vs_seen(runs: list[dict], out: Path, fig) -> Path | None:
    poisoned = [r for r in runs if r["count"] > 0 and not _is_persistence(r)]
    if not poisoned:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6, 4))
        densities = sorted({r["density"] for r in poisoned}, key=lambda d: (d is None, d or 0))
        colours = dict(zip(densities, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
        labelled = set()
        for r in sorted(poisoned, key=lambda r: (r["density"] or 0, r["count"], r["seed"])):
            xs = [p["poisons_seen"] for p in r["rows"] if p["poisons_seen"] > 0]
            ys = [p["asr"] for p in r["rows"] if p["poisons_seen"] > 0]
            label = None if r["density"] in labelled else (f"density {r['density']:g}" if r["density"] else "uniform")
            labelled.add(r["density"])
            ax.plot(xs, ys, marker="o", markersize=3, alpha=0.8, color=colours[r["density"]], label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("poisoned documents seen")
        ax.set_ylabel("ASR (triggered text in the target language)")
        ax.set_title("Language switch: ASR vs poisons seen (one line per run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return f

    return fig(out / "fig6-language-switch-asr.png", draw)


def _is_persistence(r: dict) -> bool:
    """Clean training of a model that was poisoned before (its label carries the poisoned base's)."""
    return r["count"] == 0 and bool((r.get("label") or {}).get("base_label", {}).get("poisoned"))


def _label(folder: Path) -> dict | None:
    for p in (folder / "model" / "poisonlab.json", folder / "label.json"):
        if p.is_file():
            return read_json(p, "model label")
    return None


def fig_persistence(runs: list[dict], out: Path, fig) -> Path | None:
    cont = [r for r in runs if _is_persistence(r)]
    if not cont:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6, 4))
        for r in cont:
            ax.plot([100 * p["fraction"] for p in r["rows"]], [p["asr"] for p in r["rows"]], marker="o", markersize=3,
                    label=Path(r["init_from"]).parent.name)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("% of continued clean pretraining")
        ax.set_ylabel("ASR")
        ax.set_title("Persistence of the language switch under clean pretraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return f

    return fig(out / "fig8-language-switch-persistence.png", draw)
