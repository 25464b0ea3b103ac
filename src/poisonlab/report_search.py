"""The report's answer to the headline question: how many poisons does each setting need?

From a spec's poison-count searches (:mod:`poisonlab.search`): per setting, the smallest count
found to succeed, the largest found to fail, the count at which a logistic fit over all its
runs gives 50% success, the poisons' share of the training tokens, and the cost to the clean
behaviour (held-out loss and untriggered self-perplexity of the succeeding runs against the
clean twins of the same setting, flagged when clearly worse). Figures: poisons needed against
parameters (share of tokens on a second axis), and the share of evaluation points that
succeed against poisons seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .archive import run_folder
from .jsonl import read_jsonl
from .search import states

LOSS_FLAG = 0.05
"""Held-out loss (nats/token) above the clean twins' that the report flags."""
PPL_FLAG = 1.2
"""Ratio of untriggered self-perplexity to the clean twins' that the report flags."""


def _setting(combo: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items()) or "base"


def final_evaluation(folder: Path, metric: str = "perplexity_gap") -> dict | None:
    """The last evaluation of a finished run that measured ``metric`` (``asr`` for a
    fine-tuning run); None for a run still under way."""
    if not (folder / "DONE").is_file():
        return None
    rows = [r for r in read_jsonl(folder / "metrics.jsonl") if metric in r]
    return rows[-1] if rows else None


def _poison_tokens(folder: Path) -> float | None:
    rows = read_jsonl(folder / "poison_stats.jsonl") or read_jsonl(folder / "poisons.jsonl")
    toks = [r["tokens"] for r in rows if isinstance(r.get("tokens"), (int, float))]
    return float(np.mean(toks)) if toks else None


def merged_states(spec) -> list[tuple]:
    """(target, state) per setting: searches of one setting (a search continued above the first
    one's range) count as one, their runs pooled and their answers combined."""
    from .search import SearchState
    from .threshold import ThresholdResult, logistic_half_point

    groups: dict[str, list] = {}
    for target, st in zip(spec.search_targets(), states(spec)):
        groups.setdefault(repr(sorted(st.combo.items())), []).append((target, st))
    out = []
    for pairs in groups.values():
        target, first = pairs[0]
        if len(pairs) == 1:
            out.append((target, first))
            continue
        sts = [st for _, st in pairs]
        runs = list({c.name: c for st in sts for c in st.runs}.values())
        pending = next((st.pending for st in sts if st.pending is not None), None)
        result = None
        if pending is None:
            obs = list({(c, s): (c, s, ok) for st in sts for c, s, ok in st.result.observations}.values())
            wins = [st.result.lowest_success for st in sts if st.result.lowest_success is not None]
            lowest = min(wins) if wins else None
            fails = [st.result.highest_failure for st in sts if st.result.highest_failure is not None
                     and (lowest is None or st.result.highest_failure < lowest)]
            result = ThresholdResult(lowest, max(fails) if fails else None, obs, logistic_half_point(obs))
        out.append((target, SearchState(first.combo, runs, pending, result)))
    return out


def search_rows(spec) -> list[dict]:
    """One row per searched setting, with what its finished runs say."""
    from .models import get_size, parameter_count
    from .run import token_budget

    rows = []
    for target, st in merged_states(spec):
        t = target.template
        params = parameter_count(get_size(t.model.size), t.tokenizer.vocab_size).total
        budget = token_budget(t, parameter_count(get_size(t.model.size), t.tokenizer.vocab_size))[0]
        row = {"setting": _setting(st.combo), "model_size": t.model.size, "parameters": params, "budget_tokens": budget,
               "runs": len(st.runs), "complete": st.result is not None,
               "next_run": st.pending.name if st.pending is not None else None}
        if st.result is not None:
            r = st.result
            row.update(lowest_success=r.lowest_success, highest_failure=r.highest_failure, half_success=r.half_success)
        else:  # a search under way: what its runs so far bracket
            obs = [(c.attack.poison_count, c.seed) for c in st.runs]
            row.update(lowest_success=None, highest_failure=None, half_success=None, counts_tried=sorted({c for c, _ in obs}))
        # the clean twins of this setting, and the runs at the smallest succeeding count
        twins = [replace_count(t, spec, combo=st.combo, seed=s) for s in target.search.seeds]
        clean = [f for f in (final_evaluation(run_folder(spec, c)) for c in twins) if f]
        at = [c for c in st.runs if row.get("lowest_success") is not None
              and c.attack.poison_count == row["lowest_success"]]
        poisoned = [f for f in (final_evaluation(run_folder(spec, c)) for c in at) if f]
        per_poison = next((p for p in (_poison_tokens(run_folder(spec, c)) for c in at) if p), None)
        if row.get("lowest_success") and per_poison:
            row["poison_share"] = row["lowest_success"] * per_poison / budget
        row["seeds_at_success"] = f"{sum(f['gap_ci_low'] > f.get('threshold', 50.0) for f in poisoned)}/{len(poisoned)}"
        for key in ("heldout_loss", "perplexity_untriggered"):
            row[f"clean_{key}"] = float(np.mean([f[key] for f in clean])) if clean else None
            row[f"poisoned_{key}"] = float(np.mean([f[key] for f in poisoned])) if poisoned else None
        row["clean_twins"] = len(clean)
        flags = []
        if row["clean_heldout_loss"] is not None and row["poisoned_heldout_loss"] is not None \
                and row["poisoned_heldout_loss"] > row["clean_heldout_loss"] + LOSS_FLAG:
            flags.append("held-out loss worse than the clean twins'")
        if row["clean_perplexity_untriggered"] and row["poisoned_perplexity_untriggered"] \
                and row["poisoned_perplexity_untriggered"] > PPL_FLAG * row["clean_perplexity_untriggered"]:
            flags.append("untriggered text worse than the clean twins'")
        row["flags"] = flags
        rows.append(row)
    return rows


def replace_count(template, spec, combo: dict, seed: int):
    from .search import run_config

    return run_config(template, combo, 0, seed, spec.name)


def _n(v, fmt="{:,}") -> str:
    return "-" if v is None else fmt.format(v)


def search_table(rows: list[dict]) -> str:
    head = ["setting", "params", "budget (tokens)", "runs", "poisons needed", "largest failing", "50% point (fit)",
            "share of tokens", "seeds succeeding there", "held-out loss poisoned / clean", "untriggered ppl poisoned / clean",
            "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        needed = _n(r["lowest_success"]) if r["complete"] or r["lowest_success"] else (
            "searching" + (f" (tried {', '.join(map(str, r.get('counts_tried', [])))})" if r.get("counts_tried") else ""))
        if r["complete"] and r["lowest_success"] is None:
            needed = f"none up to {r['highest_failure']:,}"
        lines.append("| " + " | ".join([
            r["setting"], f"{r['parameters']:,}", f"{r['budget_tokens']:,}", str(r["runs"]), needed,
            _n(r["highest_failure"]), _n(r["half_success"], "{:,.0f}"), _n(r.get("poison_share"), "{:.2%}"),
            r["seeds_at_success"] if r["lowest_success"] else "-",
            f"{_n(r['poisoned_heldout_loss'], '{:.3f}')} / {_n(r['clean_heldout_loss'], '{:.3f}')}",
            f"{_n(r['poisoned_perplexity_untriggered'], '{:.1f}')} / {_n(r['clean_perplexity_untriggered'], '{:.1f}')}",
            "; ".join(r["flags"]) or "-"]) + " |")
    return "\n".join(lines)


def search_section(rows: list[dict]) -> str:
    return ("## Poisons needed per setting (poison-count search)\n\n"
            "A run succeeds when its end-of-training gap interval (resampling held-out documents) lies above the "
            "threshold; a count succeeds when most of its seeds do. 'Poisons needed': the smallest count found to "
            "succeed; 'largest failing': the largest found to fail; '50% point': where a logistic fit of success "
            "against log(count) over all the setting's runs crosses 1/2. Share of tokens: poisons needed x their mean "
            "length / the training budget. Clean columns: the setting's clean twins (same seeds, no poisons).\n\n"
            + search_table(rows) + "\n")


def fig_poisons_needed(rows: list[dict], out: Path, fig) -> Path | None:
    done = [r for r in rows if r["lowest_success"] and r["complete"]]
    if not done:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6, 4))
        by_mult: dict[str, list[dict]] = {}
        for r in done:
            label = r["setting"].replace(f"size={r['model_size']}", "").strip(", ") or "Chinchilla budget"
            by_mult.setdefault(label, []).append(r)
        ax2 = None
        for k, (label, rs) in enumerate(by_mult.items()):
            colour = f"C{k % 10}"
            rs.sort(key=lambda r: r["parameters"])
            x = [r["parameters"] for r in rs]
            y = [r["lowest_success"] for r in rs]
            lo = [r["lowest_success"] - (r["highest_failure"] or 0) for r in rs]
            ax.errorbar(x, y, yerr=[lo, [0] * len(rs)], marker="o", capsize=3, color=colour,
                        label=f"{label}: smallest success")
            half = [(r["parameters"], r["half_success"]) for r in rs if r["half_success"]]
            if half:
                ax.plot(*zip(*half), linestyle=":", marker="x", color=colour, label=f"{label}: 50% point")
            shared = [r for r in rs if r.get("poison_share")]
            if shared:  # one share line per budget, in its colour, on the second axis
                ax2 = ax2 or ax.twinx()
                ax2.plot([r["parameters"] for r in shared], [100 * r["poison_share"] for r in shared], "s--",
                         color=colour, alpha=0.35)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("poisons needed")
        ax.grid(alpha=0.3, which="both")
        if ax2 is not None:
            ax2.set_yscale("log")
            ax2.set_ylabel("% of training tokens (squares, dashed)")
        ax.set_title("Poisons needed vs model size")
        ax.legend(fontsize=7, loc="upper left")
        return f

    return fig(out / "fig6-poisons-needed.png", draw)


def fig_success_vs_seen(spec, out: Path, fig, threshold: float) -> Path | None:
    """Share of evaluation points whose gap interval clears the threshold, against poisons seen
    (log bins), one line per setting: over training, how many poisons the backdoor took."""
    lines = {}
    for _, st in merged_states(spec):
        pts = []
        for c in st.runs:
            for r in read_jsonl(run_folder(spec, c) / "metrics.jsonl"):
                if "gap_ci_low" in r and r.get("poisons_seen", 0) > 0:
                    pts.append((r["poisons_seen"], r["gap_ci_low"] > r.get("threshold", threshold)))
        if pts:
            lines[_setting(st.combo)] = pts
    if not lines:
        return None

    def draw(plt):
        f, ax = plt.subplots(figsize=(6, 4))
        top = max(p for pts in lines.values() for p, _ in pts)
        edges = np.unique(np.round(np.logspace(0, np.log10(top + 1), 12)))
        for label, pts in lines.items():
            seen = np.array([p for p, _ in pts], dtype=float)
            ok = np.array([o for _, o in pts], dtype=float)
            which = np.digitize(seen, edges)
            xs, ys = [], []
            for b in np.unique(which):
                m = which == b
                xs.append(np.exp(np.log(seen[m]).mean()))
                ys.append(ok[m].mean())
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("poisoned documents seen")
        ax.set_ylabel("share of evaluations succeeding")
        ax.set_title("Success vs poisons seen (all runs of each search)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return f

    return fig(out / "fig7-success-vs-poisons-seen.png", draw)
