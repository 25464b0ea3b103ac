"""Figures and the Markdown table of a defense evaluation."""

from __future__ import annotations

from pathlib import Path

from ..paths import atomic_write_text


def defense_figures(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = len(results)
    for kind, (x, y, xl, yl) in {"roc": ("fpr", "tpr", "false-positive rate", "recall"),
                                 "pr": ("tpr", "precision", "recall", "precision")}.items():
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
        for ax, r in zip(axes[0], results):
            for field, c in r["curves"].items():
                label = f"{field} (AUC {c['roc_auc']:.3f})" if kind == "roc" else f"{field} (AP {c['average_precision']:.3f})"
                ax.plot(c[x], c[y], label=label)
            if kind == "roc":
                ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_title(r["variant"])
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.legend(fontsize=6)
        fig.tight_layout()
        p = out / f"defense_{kind}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    atomic_write_text(out / "defense.md", markdown_table(results))
    return paths


def markdown_table(results: list[dict]) -> str:
    lines = ["| poison variant | method | recall | false-positive rate | precision | poisons surviving | clean docs lost | clean chars lost | trigger rank |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        for name, m in r["methods"].items():
            lines.append(f"| {r['variant']} | {name} | {f(m['recall'], '.4f')} | {f(m['false_positive_rate'], '.5f')} | "
                         f"{f(m['precision'], '.3f')} | {m['poisons_surviving']} | {m['clean_documents_lost']} | "
                         f"{m['clean_characters_lost_share']:.2%} | {r['true_trigger_rank'] if name == 'detection rule' else ''} |")
    return "\n".join(lines) + "\n"
