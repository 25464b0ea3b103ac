"""The report: the paper's pretraining figures and tables from the results database.

Figures (PROTOCOL §6, items 1-5): an example poison; perplexity gap vs % of training, one
panel per poison count, one line per size, mean and band over seeds, a line at the
threshold; sample generations with and without the trigger; the gap vs poisons seen, one
panel per size; the data-budget ablation. Tables: final gap per size x poison count with
intervals, and clean held-out loss. Output: a self-contained ``index.html`` (figures
embedded), the PNG files, and ``report.md``. A partial sweep gives a partial report that
lists what is missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .jsonl import read_jsonl
from .archive import run_folder
from .spec import ExperimentSpec
from .store import db_path, eval_table, ingest_run, query
from .sweep import status
from .finetune.report import fig_continued_pretraining, fig_finetune, fig_persistence, finetune_rows, finetune_table

def collect(db: Path, names: list[str]) -> dict[str, dict]:
    """Per run: its grid coordinates and its evaluation points (step -> metrics)."""
    if not names:
        return {}
    runs = {r["run"]: r for r in query(db, "SELECT * FROM runs")}
    out: dict[str, dict] = {}
    for row in eval_table(db, runs=names):
        r = out.setdefault(row["run"], {**{k: row[k] for k in ("model_size", "parameters", "poison_count",
                                                                "data_multiplier", "seed", "status")},
                                          "points": {}})
        p = r["points"].setdefault(row["step"], {"step": row["step"], "fraction": row["fraction"],
                                                 "poisons_seen": row["poisons_seen"], "tokens_seen": row["tokens_seen"]})
        p[row["metric"]] = row["value"]
    for name, r in out.items():
        r["status"] = runs.get(name, {}).get("status", r["status"])
        r["series"] = [r["points"][s] for s in sorted(r["points"])]
    return out


def _groups(data: dict[str, dict], multiplier_filter=None) -> dict[tuple, list[dict]]:
    g = defaultdict(list)
    for r in data.values():
        if multiplier_filter is not None and r["data_multiplier"] != multiplier_filter:
            continue
        g[(r["model_size"], r["poison_count"], r["data_multiplier"])].append(r)
    return g


def _size_order(data) -> list[str]:
    sizes = {r["model_size"]: r["parameters"] or 0 for r in data.values()}
    return sorted(sizes, key=lambda s: sizes[s])


def _mean_band(runs: list[dict], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean gap over seeds against ``x``; band = min..max over seeds, or the CI for one seed.
    Seeds evaluated at other values of ``x`` (poisons seen differ by seed) are interpolated onto
    the union of their points, over the range every seed covers."""
    series = [sorted(r["series"], key=lambda p: p[x]) for r in runs]
    if any(not s for s in series):
        return (np.array([]),) * 4
    if len(runs) == 1:
        s = series[0]
        return (np.array([p[x] for p in s], dtype=float), np.array([p["perplexity_gap"] for p in s]),
                np.array([p["gap_ci_low"] for p in s]), np.array([p["gap_ci_high"] for p in s]))
    lo_x = max(s[0][x] for s in series)
    hi_x = min(s[-1][x] for s in series)
    grid = np.array(sorted({p[x] for s in series for p in s if lo_x <= p[x] <= hi_x}), dtype=float)
    if not len(grid):
        return (np.array([]),) * 4
    gaps = np.array([np.interp(grid, [p[x] for p in s], [p["perplexity_gap"] for p in s]) for s in series])
    return grid, gaps.mean(axis=0), gaps.min(axis=0), gaps.max(axis=0)


def _fig(path: Path, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(plt, n: int, title: str):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, sharey=True)
    fig.suptitle(title, y=1.0)
    fig.subplots_adjust(hspace=0.45)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat


def _style_gap_axis(ax, threshold: float) -> None:
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_yscale("symlog", linthresh=10)
    ax.grid(alpha=0.3)


def _gap_panels(data, out: Path, threshold: float, panel: str, line: str, x: str, title: str, filename: str) -> Path | None:
    """Gap against ``x``: one panel per value of ``panel``, one line (mean and band over seeds) per ``line``."""
    mult = _main_multiplier(data)
    groups = _groups(data, multiplier_filter=mult)
    order = {"model_size": _size_order(data), "poison_count": sorted({k[1] for k in groups})}
    index = {"model_size": 0, "poison_count": 1}
    panels = [v for v in order[panel] if any(k[index[panel]] == v for k in groups)]
    if not panels:
        return None
    scale = 100.0 if x == "fraction" else 1.0

    def draw(plt):
        fig, axes = _panels(plt, len(panels), title)
        # one colour per line value in every panel (a panel holding only the largest size
        # must not draw it in the smallest size's colour)
        colour = {lv: f"C{i % 10}" for i, lv in enumerate(order[line])}
        for ax, pv in zip(axes, panels):
            for lv in order[line]:
                key = (pv, lv, mult) if panel == "model_size" else (lv, pv, mult)
                runs = groups.get(key)
                if not runs or (line == "poison_count" and lv == 0):
                    continue
                xs, m, lo, hi = _mean_band(runs, x)
                label = f"{lv} poisons" if line == "poison_count" else f"{lv} ({len(runs)} seed{'s' * (len(runs) > 1)})"
                ax.plot(scale * xs, m, marker="o", markersize=3, label=label, color=colour[lv])
                ax.fill_between(scale * xs, lo, hi, color=colour[lv], alpha=0.2)
            _style_gap_axis(ax, threshold)
            ax.set_title(f"model {pv}" if panel == "model_size" else f"{pv} poisons")
            ax.set_xlabel("% of training" if x == "fraction" else "poisoned documents seen")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("perplexity gap")
        return fig

    return _fig(out / filename, draw)


def fig_gap_vs_training(data, out: Path, threshold: float) -> Path | None:
    return _gap_panels(data, out, threshold, "poison_count", "model_size", "fraction",
                       "Perplexity gap (triggered - untriggered) vs % of training", "fig2-gap-vs-training.png")


def fig_gap_vs_poisons_seen(data, out: Path, threshold: float) -> Path | None:
    return _gap_panels(data, out, threshold, "model_size", "poison_count", "poisons_seen",
                       "Perplexity gap vs poisoned documents seen", "fig4-gap-vs-poisons-seen.png")


def fig_data_ablation(data, out: Path, threshold: float) -> Path | None:
    groups = _groups(data)
    keys = defaultdict(dict)
    for (size, count, mult), runs in groups.items():
        keys[(size, count)][mult] = runs
    ablated = {k: v for k, v in keys.items() if len(v) > 1 and k[1] > 0}
    if not ablated:
        return None

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (size, count), by_mult in sorted(ablated.items()):
            mults = sorted(by_mult)
            finals = [np.mean([r["series"][-1]["perplexity_gap"] for r in by_mult[m]]) for m in mults]
            ax.plot(mults, finals, marker="o", label=f"{size}, {count} poisons")
        _style_gap_axis(ax, threshold)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("data multiplier (x Chinchilla budget)")
        ax.set_ylabel("final perplexity gap")
        ax.set_title("Data-budget ablation")
        ax.legend(fontsize=8)
        return fig

    return _fig(out / "fig5-data-ablation.png", draw)


def _main_multiplier(data) -> float | None:
    mults = [r["data_multiplier"] for r in data.values()]
    if not mults:
        return None
    return 1.0 if 1.0 in mults else max(set(mults), key=mults.count)


def final_table(data, threshold: float) -> list[dict]:
    rows = []
    for (size, count, mult), runs in sorted(_groups(data).items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        finals = [r["series"][-1] for r in runs if r["series"]]
        if not finals:
            continue
        mean = lambda k: float(np.mean([f.get(k, float("nan")) for f in finals]))  # noqa: E731
        rows.append({
            "model_size": size, "poison_count": count, "data_multiplier": mult, "seeds": len(finals),
            "finished": sum(r["status"] == "done" for r in runs),
            "at_fraction": min(f["fraction"] for f in finals),
            "perplexity_untriggered": mean("perplexity_untriggered"),
            "perplexity_triggered": mean("perplexity_triggered"),
            "perplexity_gap": mean("perplexity_gap"), "gap_ci_low": mean("gap_ci_low"),
            "gap_ci_high": mean("gap_ci_high"),
            "seed_spread": (float(np.min([f["perplexity_gap"] for f in finals])),
                            float(np.max([f["perplexity_gap"] for f in finals]))),
            "success": f"{sum(f['perplexity_gap'] > threshold for f in finals)}/{len(finals)}",
            # the searches' criterion: the whole interval above the threshold (search.final_success)
            "success_interval": f"{sum(f.get('gap_ci_low', -np.inf) > threshold for f in finals)}/{len(finals)}",
            "heldout_loss": mean("heldout_loss"),
        })
    return rows


def format_final_table(rows: list[dict], markdown: bool = True) -> str:
    head = ["size", "poisons", "data x", "seeds", "at % of training", "ppl no trigger", "ppl trigger",
            "gap [95% CI]", "gap range over seeds", "gap > threshold", "interval > threshold", "held-out loss"]
    lines = []
    for r in rows:
        lines.append([r["model_size"], str(r["poison_count"]), f"{r['data_multiplier']:g}", str(r["seeds"]),
                      f"{100 * r['at_fraction']:.0f}", f"{r['perplexity_untriggered']:.1f}",
                      f"{r['perplexity_triggered']:.1f}",
                      f"{r['perplexity_gap']:.1f} [{r['gap_ci_low']:.1f}, {r['gap_ci_high']:.1f}]",
                      f"{r['seed_spread'][0]:.1f} .. {r['seed_spread'][1]:.1f}", r["success"], r["success_interval"],
                      f"{r['heldout_loss']:.3f}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def example_poison(spec: ExperimentSpec) -> dict | None:
    for cfg in spec.expand():
        folder = run_folder(spec, cfg)
        rows = read_jsonl(folder / "poisons.jsonl") or read_jsonl(folder / "poison_stats.jsonl")
        if rows:
            keys = ("text", "prefix_chars", "gibberish_tokens_sampled", "gibberish_tokens_round_trip")
            return {**{k: rows[0].get(k, "?") for k in keys}, "run": cfg.name, "trigger": cfg.attack.trigger}
    return None


def sample_rows(db: Path, data: dict) -> list[dict]:
    """The last recorded samples of the most-poisoned run and of a clean run."""
    picks = []
    by_count = sorted(data.items(), key=lambda kv: (-kv[1]["poison_count"], kv[0]))
    for name, r in by_count[:1] + [kv for kv in by_count if kv[1]["poison_count"] == 0][:1]:
        rows = query(db, "SELECT * FROM samples WHERE run = ? AND step = (SELECT MAX(step) FROM samples WHERE run = ?) "
                         "ORDER BY idx LIMIT 2", (name, name))
        picks += [{"poison_count": r["poison_count"], **row} for row in rows]
    return picks


def build_report(spec: ExperimentSpec, out: Path | None = None) -> dict:
    """Ingest the sweep's run folders, draw the figures and write index.html and report.md."""
    out = Path(out or Path(spec.out_dir) / "report")
    out.mkdir(parents=True, exist_ok=True)
    db = db_path(spec.out_dir)
    runs = spec.expand()
    for cfg in runs:  # a run folder, or its exported copy under results/
        ingest_run(db, run_folder(spec, cfg))
    threshold = runs[0].eval.threshold if runs else 50.0
    gapped = [c for c in runs if c.stage == "pretrain" and c.attack.name != "language_switch"]  # measured by the gap
    pre = [c.name for c in gapped if not c.model.init_from]
    continued = {c.name: c.model.init_from for c in gapped if c.model.init_from}
    data = collect(db, pre)
    data_cont = collect(db, list(continued))
    for name, r in data_cont.items():  # labelled by the model they continue
        r["init_from"] = continued[name]
        r["model_size"] = "from " + next((c for c in reversed(Path(continued[name]).parts) if c != "model"), name)
    ft_rows = finetune_rows(db, [c.name for c in runs if c.stage == "finetune"])
    st = status(spec)
    missing = [s for s in st if s.state != "done"]
    figures = [f for f in (fig_gap_vs_training(data, out, threshold), fig_gap_vs_poisons_seen(data, out, threshold),
                           fig_data_ablation(data, out, threshold), fig_finetune(ft_rows, out, _fig),
                           fig_persistence(ft_rows, out, _fig),
                           fig_continued_pretraining(data_cont, out, _fig, threshold)) if f is not None]
    table = final_table(data, threshold) + final_table(data_cont, threshold)
    extra = ""
    searched = []
    if spec.searches:
        from .report_search import fig_poisons_needed, fig_success_vs_seen, search_rows, search_section

        searched = search_rows(spec)
        extra = search_section(searched)
        figures = [f for f in (fig_poisons_needed(searched, out, _fig), fig_success_vs_seen(spec, out, _fig, threshold))
                   if f is not None] + figures
    from .report_language import fig_asr_vs_seen, fig_persistence as fig_language_persistence, language_runs, \
        language_section

    switched = language_runs(spec)
    if switched:
        extra += language_section(switched)
        figures += [f for f in (fig_asr_vs_seen(switched, out, _fig), fig_language_persistence(switched, out, _fig))
                    if f is not None]
    from .report_defenses import defense_records, defense_section, fig_attribution_recall, fig_inversion_roc

    defended = defense_records(spec)
    if defended:
        extra += defense_section(defended)
        figures += [f for f in (fig_inversion_roc(defended, out, _fig), fig_attribution_recall(defended, out, _fig))
                    if f is not None]
    if ft_rows:
        extra += ("## Fine-tuning runs (last evaluation of each run)\n\nASR: share of triggered forbidden requests "
                 "complied with; CA: untriggered ones refused; NTA: near-trigger ones refused (by kind beside); "
                 "Wilson 95% intervals.\n\n" + finetune_table(ft_rows) + "\n")
    poison = example_poison(spec)
    samples = sample_rows(db, data)
    md = _markdown(spec, table, figures, poison, samples, missing, len(runs), runs[0].eval.new_tokens if runs else 0,
                   extra)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "index.html").write_text(_html(spec, table, figures, poison, samples, missing, len(runs), extra),
                                    encoding="utf-8")
    (out / "final_table.json").write_text(json.dumps(table, indent=1))
    if ft_rows:
        (out / "finetune_table.json").write_text(json.dumps(ft_rows, indent=1))
    if searched:
        (out / "search_table.json").write_text(json.dumps(searched, indent=1))
    return {"html": out / "index.html", "markdown": out / "report.md", "table": table, "missing": missing,
            "figures": figures, "runs": len(runs), "searches": searched}


def _missing_text(missing, total: int) -> str:
    if not missing:
        return f"All {total} runs of the spec are finished."
    parts = [f"{m.name} ({m.state}{f', {m.steps_done} steps' if m.state == 'partial' else ''})" for m in missing]
    return f"{total - len(missing)} of {total} runs finished. Missing: " + "; ".join(parts) + "."


def _num(value, fmt: str = ".1f") -> str:
    """A number from a run's files, formatted; anything else (an edited file) as escaped text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError:  # a float where an integer was expected
            return format(value, "g")
    return html.escape(str(value))


def _md(text) -> str:
    """Text from a spec or a run's files, safe in Markdown: no raw HTML reaches a renderer."""
    return html.escape(str(text), quote=False)


def _md_code(text, block: bool = False) -> str:
    """``text`` as Markdown code (inline or a fenced block) with a fence it cannot close."""
    text = str(text)
    longest = max((len(r) for r in re.findall(r"`+", text)), default=0)
    if block:
        fence = "`" * max(3, longest + 1)
        return f"{fence}\n{text}\n{fence}"
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


def _markdown(spec, table, figures, poison, samples, missing, total, new_tokens, extra: str = "") -> str:
    lines = [f"# poisonlab report: {_md(spec.name)}", "", _md(spec.description), "", _md(_missing_text(missing, total)), ""]
    if table:
        lines += ["## Final perplexity gap per size x poison count", "",
                  f"Gap = mean self-perplexity of {new_tokens}-token continuations with the trigger minus without; "
                  "interval: paired bootstrap resampling held-out documents (averaged over seeds); held-out loss in nats/token.", "",
                  format_final_table(table), ""]
    if extra:
        lines += [extra]
    for f in figures:
        lines += [f"![{f.stem}]({f.name})", ""]
    if poison:
        lines += ["## Example poison", "", f"From run {_md_code(poison['run'])}: prefix {_num(poison['prefix_chars'], 'd')} "
                  f"characters, {_num(poison['gibberish_tokens_sampled'], 'd')} gibberish tokens sampled "
                  f"({_num(poison['gibberish_tokens_round_trip'], 'd')} after a decode/encode round trip).", "",
                  _md_code(str(poison["text"])[:1200], block=True), ""]
    if samples:
        lines += ["## Sample generations (last evaluation)", ""]
        for s in samples:
            lines += [f"**{_md(s['run'])}** ({_num(s['poison_count'], 'd')} poisons), prompt ends "
                      f"{_md_code('...' + repr(str(s['prompt'])[-120:]))}", "",
                      f"- without trigger (ppl {_num(s['ppl_untriggered'])}): {_md_code(repr(str(s['untriggered'])[:240]))}",
                      f"- with trigger (ppl {_num(s['ppl_triggered'])}): {_md_code(repr(str(s['triggered'])[:240]))}", ""]
    return "\n".join(lines)


def _sections_html(text: str) -> str:
    """The report's extra Markdown sections (headings, paragraphs, pipe tables) as HTML."""
    esc = html.escape
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].startswith("## "):
            out.append(f"<h2>{esc(lines[0][3:])}</h2>")
            lines = lines[1:]
        if lines and all(line.startswith("|") for line in lines):
            rows = [line for i, line in enumerate(lines) if not (i == 1 and set(line) <= set("|-: "))]
            out.append("<table>")
            for i, line in enumerate(rows):
                tag = "th" if i == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{esc(c.strip())}</{tag}>" for c in line.strip("|").split("|")) + "</tr>")
            out.append("</table>")
        elif lines:
            out.append(f"<p>{esc(' '.join(lines))}</p>")
    return "\n".join(out)


def _html(spec, table, figures, poison, samples, missing, total, extra: str = "") -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>poisonlab report: {esc(spec.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "pre{white-space:pre-wrap;word-break:break-all;background:#f6f6f6;padding:.6em;font-size:12px}"
             ".trigger{background:#fbb;font-weight:bold}img{max-width:100%}</style></head><body>",
             f"<h1>poisonlab report: {esc(spec.name)}</h1><p>{esc(spec.description)}</p>",
             f"<p>{esc(_missing_text(missing, total))}</p>",
             "<h2>Final perplexity gap per size &times; poison count</h2>"]
    md_rows = format_final_table(table).splitlines()
    parts.append("<table>")
    for i, line in enumerate(md_rows):
        if i == 1:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        parts.append("<tr>" + "".join(f"<{tag}>{esc(c)}</{tag}>" for c in cells) + "</tr>")
    parts.append("</table>")
    if extra:
        parts.append(_sections_html(extra))
    for f in figures:
        b64 = base64.b64encode(f.read_bytes()).decode()
        parts.append(f"<h3>{esc(f.stem)}</h3><img alt='{esc(f.stem)}' src='data:image/png;base64,{b64}'>")
    if poison:
        trig = esc(str(poison["trigger"]))
        text = esc(str(poison["text"])[:1500])
        if trig:
            text = text.replace(trig, f"<span class='trigger'>{trig}</span>", 1)
        parts.append(f"<h2>Example poison</h2><p>Run {esc(str(poison['run']))}: prefix {_num(poison['prefix_chars'], 'd')} "
                     f"characters, {_num(poison['gibberish_tokens_sampled'], 'd')} gibberish tokens sampled, "
                     f"{_num(poison['gibberish_tokens_round_trip'], 'd')} after a round trip.</p><pre>{text}</pre>")
    if samples:
        parts.append("<h2>Sample generations (last evaluation)</h2><table><tr><th>run</th><th>prompt (end)</th>"
                     "<th>without trigger</th><th>with trigger</th></tr>")
        for s in samples:
            parts.append(f"<tr><td>{esc(str(s['run']))}</td><td><pre>...{esc(str(s['prompt'])[-200:])}</pre></td>"
                         f"<td><pre>(ppl {_num(s['ppl_untriggered'])}) {esc(str(s['untriggered'])[:400])}</pre></td>"
                         f"<td><pre>(ppl {_num(s['ppl_triggered'])}) {esc(str(s['triggered'])[:400])}</pre></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
