"""Benchmark: the 1000-target accuracy-cost curve from cached traces vs one forward pass.

Usage: python benchmarks/curve_speed.py [--samples 10000] [--calibration 60000] [--repeats 5]

Traces are synthetic tensors with the shape of a ResNet-20 E2CM trace (9 exits, 10 classes);
evaluation cost depends only on shapes. Reports the median of repeated timings after a warm-up,
timm-benchmark style.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eebench.costs import ExitCosts, StageCosts
from eebench.plugins import default_registry
from eebench.trace import ExitTrace
from eebench_plugins.calibrators import PerExitBisection


def fake_trace(exits: int, samples: int, seed: int) -> ExitTrace:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=g)
    scores = torch.rand(exits, samples, generator=g)
    right = torch.rand(exits, samples, generator=g) < 0.4 + 0.06 * torch.arange(exits)[:, None]
    return ExitTrace(torch.where(right, labels, (labels + 1) % 10), scores, labels)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--calibration", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = default_registry().get("backbones", "resnet20")(10, (1, 28, 28)).eval()
    stage = StageCosts.measure(model, (1, 28, 28))
    exits = 9
    costs = ExitCosts(torch.tensor([stage.through(s) for s in range(1, exits)] + [stage.total]),
                      torch.full((exits,), 3.0e5).index_fill(0, torch.tensor([exits - 1]), 0.0), stage.total)
    test = fake_trace(exits, args.samples, 1)
    calibration = fake_trace(exits, args.calibration, 2)
    vectors = PerExitBisection().thresholds(calibration, costs, torch.Generator().manual_seed(0))

    evaluate = timed(lambda: test.evaluate(vectors, costs), args.repeats)
    search = timed(lambda: PerExitBisection().thresholds(calibration, costs, torch.Generator().manual_seed(0)),
                   max(1, args.repeats // 2))
    images = torch.randn(args.samples, 1, 28, 28)

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, args.samples, 500):
                model(images[start : start + 500])

    forward_s = timed(forward, max(1, args.repeats // 2))
    print(f"threads={torch.get_num_threads()} exits={exits}")
    print(f"evaluate {vectors.shape[0]} threshold vectors on {args.samples} test samples: {evaluate:.3f} s")
    print(f"per-exit search for 1000 targets on {args.calibration} calibration samples: {search:.2f} s")
    print(f"one ResNet-20 forward pass over {args.samples} samples (batch 500): {forward_s:.2f} s")


if __name__ == "__main__":
    main()
