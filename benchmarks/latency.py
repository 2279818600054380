"""Benchmark: measured early-exit speedup of E²CM and SDN on ResNet-20 / Fashion-MNIST vs their MACs.

Usage: python benchmarks/latency.py [--run-dir runs/fixed_budget_1epoch] [--methods E²CM,SDN]
                                    [--target 0.5] [--repeats 7] [--threads N]

Reads the finished cells of a run of the default suite (``make run`` writes them), rebuilds each
named method's fitted network from its saved state and times, in this process, the plain
backbone and the method's φ policy (batch 1, and batch 256 with compaction and with masking;
``eebench.bench``). It prints the measured and MAC speedups and their ratio against the
issue's targets: batch-1 measured ≥ 0.8 × MAC, batch-256 compacted ≥ 0.6 × MAC. Nothing is
written. Run it on a quiet machine: the ratios are measured in one process, minutes apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eebench.bench import bench_strategy, finished_results, rebuild_strategy
from eebench.plugins import default_registry
from eebench.progress import set_quiet
from eebench.suite import LatencySpec

TARGETS = {"batch1": 0.8, "compact@256": 0.6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/fixed_budget_1epoch")
    parser.add_argument("--methods", default="E²CM,SDN", help="method labels, comma-separated")
    parser.add_argument("--target", type=float, default=0.5, help="φ")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=2000, help="test samples at batch 256")
    parser.add_argument("--batch1-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_quiet(True)
    run_dir = Path(args.run_dir)
    wanted = [m.strip() for m in args.methods.split(",")]
    results = {r["method"]: r for r in finished_results(run_dir) if r["method"] in wanted}
    if not results:
        print(f"no finished cell of {wanted} in {run_dir}; run `make run` first", file=sys.stderr)
        return 2
    settings = LatencySpec(batch_sizes=[1, 256], samples=args.samples, batch1_samples=args.batch1_samples,
                           repeats=args.repeats, threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"φ = {args.target:g}; {torch.get_num_threads()} threads; median of {args.repeats} passes "
          f"({args.batch1_samples} samples at batch 1, {args.samples} at batch 256)")
    print("| method | MAC speedup | batch 1 | ratio (≥ 0.80) | batch 256 compacted | ratio (≥ 0.60) | "
          "batch 256 masked | plain backbone batch 1 / 256 |")
    print("|---|---|---|---|---|---|---|---|")
    registry = default_registry()
    missed = 0
    for label in wanted:
        result = results.get(label)
        if result is None:
            print(f"| {label} | not in {run_dir} |  |  |  |  |  |  |")
            continue
        strategy, images = rebuild_strategy(run_dir, result, registry, device)
        block = bench_strategy(strategy, result, images, settings, [args.target], device)
        policy = block["policies"][f"{args.target:g}"]
        if policy is None:
            print(f"| {label} | cannot run at φ = {args.target:g} |  |  |  |  |  |  |")
            continue
        modes = policy["modes"]
        cells = []
        for key in ("batch1", "compact@256"):
            ratio = modes[key]["speedup"] / modes[key]["mac_speedup"]
            missed += ratio < TARGETS[key]
            cells += [f"{modes[key]['speedup']:.2f}×", f"{ratio:.2f} {'met' if ratio >= TARGETS[key] else 'MISSED'}"]
        plain = block["backbone"]
        masked = modes["masked@256"]["speedup"]
        print(f"| {label} | {policy['mac_speedup']:.2f}× | {' | '.join(cells)} | {masked:.2f}× | "
              f"{plain['1']['ms_per_sample']:.2f} ms / {plain['256']['samples_per_s']:,.0f} samples/s |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
