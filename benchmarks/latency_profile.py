"""Profile: where a φ policy's time goes at batch 1 and at batch 256 (compacted).

Usage: python benchmarks/latency_profile.py RUN_DIR METHOD_LABEL [PHI] [SAMPLES]
e.g.   python benchmarks/latency_profile.py runs/fixed_budget_1epoch E²CM 0.5 300

Batch 1: the plain backbone, the policy, the backbone stages alone on each sample's path (down to
its exit: what the MAC count predicts), the time inside ``exit_step`` (the exit heads) and the rest
(the executor's bookkeeping). Batch 256 (1024 samples): the share of the policy's time spent in the
exit heads. Medians of 5 passes; run it on a quiet machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eebench.bench import finished_results, rebuild_strategy
from eebench.inference import EarlyExitNetwork, ExitPolicy
from eebench.plugins import default_registry
from eebench.progress import set_quiet
from eebench.stepping import ExitPlan


def median_ms(run: Callable[[], object], samples: int, repeats: int = 5) -> float:
    """Median milliseconds per sample of ``run`` (which handles ``samples`` samples)."""
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return sorted(times)[repeats // 2] / samples * 1000


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, method = Path(args[0]), args[1]
    target = args[2] if len(args) > 2 else "0.5"
    count = int(args[3]) if len(args) > 3 else 300
    set_quiet(True)
    result = next(r for r in finished_results(run_dir) if r["method"] == method)
    strategy, images = rebuild_strategy(run_dir, result, default_registry(), torch.device("cpu"))
    policy = ExitPolicy.from_result(result, target)
    stream = images[:count]
    network = EarlyExitNetwork(strategy, policy, count, "cpu")
    exits, _ = network.predict(stream, 1, "batch1")
    plan = ExitPlan(strategy)

    def stages_only() -> None:
        for i in range(count):
            h = stream[i : i + 1]
            for segment in plan.segments[: int(exits[i]) + 1]:
                for stage in segment:
                    h = stage(h)

    in_heads = [0.0]
    step = strategy.exit_step

    def timed_step(j: int, features: torch.Tensor, state: dict) -> object:
        tick = time.perf_counter()
        out = step(j, features, state)
        in_heads[0] += time.perf_counter() - tick
        return out

    def head_time(run: Callable[[], object], samples: int) -> float:
        strategy.exit_step = timed_step
        in_heads[0] = 0.0
        run()
        strategy.exit_step = step
        return in_heads[0] / samples * 1000

    with torch.inference_mode():
        plain = median_ms(lambda: [strategy.backbone(stream[i : i + 1]) for i in range(count)], count)
        policy_ms = median_ms(lambda: network.predict(stream, 1, "batch1"), count)
        stages = median_ms(stages_only, count)
        heads = head_time(lambda: network.predict(stream, 1, "batch1"), count)
        batched = images[:1024]
        big = EarlyExitNetwork(strategy, policy, int(batched.shape[0]), "cpu")
        plain_256 = median_ms(lambda: [strategy.backbone(batched[i : i + 256]) for i in range(0, 1024, 256)], 1024)
        policy_256 = median_ms(lambda: big.predict(batched, 256, "compact"), 1024)
        heads_256 = head_time(lambda: big.predict(batched, 256, "compact"), 1024)
    cost = float(policy.row_costs(exits, 0, strategy.exit_costs(), strategy.chained).mean())
    print(f"{method} φ={target}, batch 1 ({count} samples): plain backbone {plain:.3f} ms; policy {policy_ms:.3f} ms "
          f"(speedup {plain / policy_ms:.2f}, MAC {1 / cost:.2f}, ratio {plain / policy_ms * cost:.2f}); stages on the "
          f"samples' paths {stages:.3f} ms ({plain / stages:.2f}x), exit heads {heads:.3f} ms, executor bookkeeping "
          f"{max(0.0, policy_ms - stages - heads):.3f} ms; exit counts "
          f"{exits.bincount(minlength=strategy.num_exits()).tolist()}")
    print(f"  batch 256 compacted (1024 samples): plain {plain_256:.3f} ms/sample; policy {policy_256:.3f} ms/sample "
          f"(speedup {plain_256 / policy_256:.2f}); exit heads {heads_256:.3f} ms/sample = "
          f"{heads_256 / policy_256:.0%} of the policy's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
