"""``poisonlab demo``: the demo spec on the offline default corpus, then its report.

The spec (``configs/demo.yaml``) trains tiny models with several poison counts, zero
included, on the same data order and seed; the report shows the perplexity gap each count
produces and where the threshold is crossed.
"""

from __future__ import annotations

import time

from .report import build_report, format_final_table
from .spec import load_spec, packaged_spec
from .sweep import run_sweep


def run_demo(out_dir: str | None = None, workers: int = 0) -> int:
    spec = load_spec(packaged_spec("demo"), out_dir=out_dir)
    t0 = time.perf_counter()
    runs = spec.expand()
    print(f"poisonlab demo: {len(runs)} runs ({', '.join(c.name for c in runs)}) into {spec.out_dir}", flush=True)
    run_sweep(spec, workers=workers)
    res = build_report(spec)
    print()
    print(format_final_table(res["table"], markdown=False))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    print(f"report: {res['html']}\n        {res['markdown']}")
    return 0
