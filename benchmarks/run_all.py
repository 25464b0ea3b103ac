"""Run every benchmark and print one table of ratios measured in the same run.

    python benchmarks/run_all.py            # full (tokenizes a 1 GB corpus: several minutes)
    python benchmarks/run_all.py --quick    # smaller corpus and fewer steps
    python benchmarks/run_all.py --device cuda

Each figure is a ratio against a reference measured in the same process a moment before or
after, so it holds on a noisy machine; absolute rates are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data  # noqa: E402
import bench_eval  # noqa: E402
import bench_train  # noqa: E402
from common import cores, machine, matmul_flops  # noqa: E402

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="tiny,1m,4m,12m")
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--json", help="also write all results here")
    args = ap.parse_args()
    torch.set_num_threads(cores())
    results: dict = {"machine": machine()}
    print(f"machine: {results['machine']}")

    if args.device == "cpu":
        peak = matmul_flops()
        results["fp32_matmul_flop_s"] = peak
        print(f"fp32 matmul rate (1024^3, {torch.get_num_threads()} threads, this process): {peak / 1e9:.1f} GFLOP/s")
        sizes = args.sizes.split(",")
    else:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
        results["bf16_peak_flop_s"] = peak
        print(f"device {name}, bf16 dense peak {peak / 1e12 if peak else '?'} TFLOP/s")
        sizes = ["125m"]

    print("\n== training throughput ==")
    if args.device == "cpu":
        print("each size in a fresh process: its own fp32 matmul rate (the MFU reference); the HF loop first with the\n"
              "C library's allocator as a plain script has it, then with train.keep_freed_memory's setting, as ours")
    print(f"{'size':>6} {'params':>12} {'matmul GF/s':>11} {'ours tok/s':>11} {'HF loop tok/s':>14} {'speedup':>8}"
          f" {'MFU':>6} {'HF MFU':>7} {'HF, same alloc':>15} {'speedup':>8}"
          f" {'compiled tok/s':>15} {'speedup':>8} {'MFU':>6} {'compile s':>10}")
    results["train"] = []
    nan = float("nan")
    for size in sizes:
        steps = 3 if args.quick else 8
        if args.device == "cpu":
            r = bench_train.run_in_fresh_process(size, steps=steps)
        else:
            r = bench_train.run(size, steps=steps, device=args.device, peak_flops=peak)
        results["train"].append(r)
        print(f"{size:>6} {r['parameters']:>12,} {r.get('fp32_matmul_flop_s', nan) / 1e9:>11.1f}"
              f" {r['ours_tok_s']:>11,.0f} {r['reference_tok_s']:>14,.0f} "
              f"{r['speedup']:>7.2f}x {r.get('mfu', nan):>6.1%} {r.get('reference_mfu', nan):>7.1%}"
              f" {r.get('reference_same_allocator_tok_s', nan):>15,.0f} {r.get('speedup_same_allocator', nan):>7.2f}x"
              f" {r.get('compiled_tok_s', nan):>15,.0f} {r.get('compiled_speedup', nan):>7.2f}x"
              f" {r.get('compiled_mfu', nan):>6.1%} {r.get('compile_seconds', nan):>10.0f}")

    print("\n== evaluation throughput (sampling + self-scoring) ==")
    results["eval"] = []
    # the evaluation's own settings (100 prompts, 256 new tokens) at the demo size, then a
    # shorter setting at the demo size and the largest CPU size
    if args.device != "cpu":
        settings = [("125m", 100, 256)]
    elif args.quick:
        settings = [("1m", 32, 64), (sizes[-1], 32, 64)]
    else:
        settings = [("1m", 100, 256), ("1m", 64, 128), (sizes[-1], 64, 128)]
    for size, n_prompts, n_new in settings:
        if args.device == "cpu":
            r = bench_eval.run_in_fresh_process(size=size, prompts=n_prompts, new_tokens=n_new)
        else:
            r = bench_eval.run(size=size, prompts=n_prompts, new_tokens=n_new, device=args.device)
        results["eval"].append(r)
        print(f"{r['size']}, {n_prompts} prompts x {n_new} new tokens: ours {r['ours_tok_s']:,.0f} tok/s, "
              f"generate+score {r['generate_tok_s']:,.0f} tok/s, "
              f"speedup {r['speedup']:.2f}x (mean log-prob/token {r['mean_logprob']:.4f} vs "
              f"{r['generate_mean_logprob']:.4f}); with sampler multinomial {r['multinomial_tok_s']:,.0f} tok/s, "
              f"{r['multinomial_speedup']:.2f}x, identical sampled tokens {r['identical_tokens']:.1%}")
        if "speedup_same_allocator" in r:
            print(f"    both with train.keep_freed_memory's allocator setting: ours {r['ours_same_allocator_tok_s']:,.0f}"
                  f" tok/s, generate+score {r['generate_same_allocator_tok_s']:,.0f} tok/s, "
                  f"speedup {r['speedup_same_allocator']:.2f}x")

    if args.device == "cpu":
        print("\n== data ==")
        gb = 0.1 if args.quick else 1.0
        r = bench_data.tokenize(Path(args.work), gb)
        results["tokenize"] = r
        print(f"tokenized {r['corpus_bytes'] / 1e9:.2f} GB -> {r['tokens']:,} tokens in {r['seconds']:.0f} s: "
              f"{r['tokens_per_s']:,.0f} tokens/s on {cores()} cores, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        lc = bench_data.loader_cost()
        results["loader"] = lc
        step_s = results["train"][-1]["ours_tok_s"] and 32 * 128 / results["train"][-1]["ours_tok_s"]
        print(f"data loader: {lc['seconds_per_step'] * 1e3:.2f} ms per step of 32x128 tokens "
              f"= {lc['seconds_per_step'] / step_s:.1%} of a {sizes[-1]} training step")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
