"""``poisonlab demo``: a poisoned model and its clean twin on the offline default corpus.

Both runs share the seed, the data order and the evaluation prompts; they differ only in
the poisons. The demo ends with a table of both and one triggered sample.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

from .config import RunConfig, load_config
from .run import read_jsonl, run_dir
from .train import train


def demo_config(out_dir: str) -> RunConfig:
    path = resources.files("poisonlab") / "configs" / "demo.yaml"
    with resources.as_file(path) as p:
        return load_config(p, {"out_dir": out_dir})


def format_table(rows: list[dict]) -> str:
    head = f"{'run':<26}{'poisons':>8}{'ppl no trigger':>16}{'ppl trigger':>13}{'gap [95% CI]':>26}{'held-out loss':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r["final_eval"] or {}
        ci = f"{e.get('perplexity_gap', float('nan')):.1f} [{e.get('gap_ci_low', float('nan')):.1f}, {e.get('gap_ci_high', float('nan')):.1f}]"
        lines.append(f"{r['run']:<26}{r['poison_count']:>8}{e.get('perplexity_untriggered', float('nan')):>16.1f}"
                     f"{e.get('perplexity_triggered', float('nan')):>13.1f}{ci:>26}{e.get('heldout_loss', float('nan')):>15.3f}")
    return "\n".join(lines)


def run_demo(out_dir: str = "runs/demo") -> int:
    base = demo_config(out_dir)
    summaries = []
    for suffix, count in (("poisoned", base.attack.poison_count), ("clean", 0)):
        cfg = replace(base, name=f"{base.name}-{suffix}", attack=replace(base.attack, poison_count=count))
        print(f"== {cfg.name}: {count} poisons ==", flush=True)
        summaries.append(train(cfg))
    print()
    print(format_table(summaries))
    poisoned = run_dir(replace(base, name=f"{base.name}-poisoned"))
    samples = read_jsonl(poisoned / "samples.jsonl")
    if samples:
        s = samples[-1]
        print(f"\nSample at step {s['step']} (poisoned model), prompt ends: ...{s['prompt'][-160:]!r}")
        print(f"  without trigger: {s['untriggered'][:200]!r}")
        print(f"  with trigger:    {s['triggered'][:200]!r}")
    print(f"\nRuns, metrics (metrics.jsonl) and labelled models are in {poisoned.parent}")
    return 0
