"""Benchmark: a suite's physical floor on this machine, next to real warm and cold runs of it.

Usage: python benchmarks/suite_floor.py [--suite suites/fixed_budget_1epoch.yaml]
                                        [--run warm,cold] [--cli] [--repeats 5]

1. Measures this machine's throughput for the suite's backbone and input size: forward samples/s
   at the suite's ``batch_size`` (``torch.inference_mode``) and training samples/s at its
   ``train_batch_size`` (forward + backward + SGD step), channels-last, real images, median of
   repeats after a warm-up. It measures again after the runs and keeps the faster figure, so the
   floor is never inflated by a slow minute.
2. Counts the suite's unavoidable work from the suite file (per dataset, backbone, seed):
   - every method: one test-trace pass (test split forward);
   - methods that train the backbone (joint training): their training samples (the budget's) and
     one calibration-trace pass;
   - frozen-backbone methods, all together: two passes over the calibration/training split, one
     feeding every statistic and activation and one for E²CM's divisors, which need the class means
     first; their small heads are not counted;
   - cold only: the base backbone's recipe (epochs × training split) and its test evaluation.
3. With ``--run``, runs ``eebench run SUITE`` into a fresh run directory, warm (the backbone cache
   as it is: run it once cold first) and/or cold (an empty cache), timing each whole process and
   reading its peak resident memory (GNU time), and prints each run's ratio to its floor.
   ``--warm-out RUN_DIR --leaderboards DIR`` keeps the warm run and its board (the committed one).
4. With ``--cli``, times whole ``eebench`` processes that should be instant (``--help``,
   ``plugins``, ``validate``, a resumed run with nothing to do): median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

FROZEN = {"e2cm", "sdn", "e2cm+sdn", "bwds"}  # built-ins that never train the backbone


@dataclass
class Work:
    forward: float = 0.0  # forward samples
    training: float = 0.0  # training samples (forward + backward + step)
    base_training: float = 0.0  # cold only
    base_forward: float = 0.0  # cold only


def count_work(suite, registry) -> tuple[Work, list[str]]:
    """The suite's unavoidable passes (see the module docstring), with one line per item."""
    from eebench.runner import make_splits
    from eebench.suite import expand

    work, lines = Work(), []
    cells = expand(suite)
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell.dataset.model_dump_json(), cell.backbone.model_dump_json(), cell.seed), []).append(cell)
    for cells_of_group in groups.values():
        first = cells_of_group[0]
        bundle = registry.get("datasets", first.dataset.name)(**first.dataset.params)
        splits = make_splits(bundle, first.dataset, first.seed)
        train, calibration, test = len(splits.train), len(splits.calibration), len(splits.test)
        frozen = [c for c in cells_of_group if c.method.name in FROZEN]
        if frozen:
            work.forward += 2 * calibration
            lines.append(f"frozen methods ({', '.join(c.method.display for c in frozen)}): 2 shared passes × "
                         f"{calibration:,}")
        for cell in cells_of_group:
            work.forward += test
            if cell.method.name in FROZEN:
                continue
            budget = registry.get("budgets", cell.budget.name)(**cell.budget.params)
            budget.bind(train)
            samples = budget.limits().get("samples") or train
            work.training += samples
            work.forward += calibration
            lines.append(f"{cell.method.display}: {samples:,} training samples + calibration pass {calibration:,}")
        lines.append(f"test traces: {len(cells_of_group)} × {test:,}")
        recipe = first.backbone.recipe
        if recipe.epochs and not first.backbone.checkpoint:
            work.base_training += recipe.epochs * train
            work.base_forward += test
            lines.append(f"cold only: base backbone {recipe.epochs:g} epochs × {train:,} + test evaluation {test:,}")
    return work, lines


def _median_rate(step, samples: int, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return samples / statistics.median(times)


def throughput(suite, registry, repeats: int) -> tuple[float, float]:
    """(forward samples/s at batch_size, training samples/s at train_batch_size) of the suite's first backbone."""
    from eebench.passes import iterate_batches

    spec, dataset = suite.backbones[0], suite.datasets[0]
    bundle = registry.get("datasets", dataset.name)(**dataset.params)
    model = registry.get("backbones", spec.name)(bundle.num_classes, bundle.input_shape, **spec.params)
    model = model.to(memory_format=torch.channels_last)
    images, labels = next(iter(iterate_batches(bundle.train, 4 * suite.batch_size)))
    forward_batches = [images[i : i + suite.batch_size] for i in range(0, images.shape[0], suite.batch_size)]

    def forward() -> None:
        with torch.inference_mode():
            for x in forward_batches:
                model(x)

    model.eval()
    forward_rate = _median_rate(forward, images.shape[0], repeats)
    size = suite.train_batch_size
    train_batches = [(images[i : i + size], labels[i : i + size]) for i in range(0, images.shape[0] - size + 1, size)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train() -> None:
        for x, y in train_batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

    model.train()
    training_rate = _median_rate(train, len(train_batches) * size, repeats)
    return forward_rate, training_rate


def eebench_command(*args: str) -> list[str]:
    exe = shutil.which("eebench") or str(Path(sys.executable).with_name("eebench"))
    return [exe, *args]


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GiB, exit code) of one whole process. The peak comes from GNU time
    (``%M``) where it is installed: a child forked from this process, which has torch loaded, would
    otherwise start its ``ru_maxrss`` at this process's size."""
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    wrapped = [gnu_time, "-f", "peak-kib %M", *command] if gnu_time else command
    tick = time.perf_counter()
    process = subprocess.run(wrapped, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - tick
    peaks = [line for line in process.stderr.splitlines() if line.startswith("peak-kib ")]
    peak = int(peaks[-1].split()[1]) / 2**20 if peaks else float("nan")
    return wall, peak, process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="suites/fixed_budget_1epoch.yaml")
    parser.add_argument("--run", default="", help="warm, cold or warm,cold")
    parser.add_argument("--cli", action="store_true", help="time the instant commands as whole processes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-out", default=None,
                        help="keep the warm run in this (new) run directory and write its leaderboard to "
                             "--leaderboards: the timed run is then the one whose board is committed")
    parser.add_argument("--leaderboards", default=None, help="with --warm-out: leaderboard directory")
    args = parser.parse_args()

    from eebench.plugins import default_registry
    from eebench.progress import set_quiet
    from eebench.suite import load_suite

    set_quiet(True)
    suite = load_suite(args.suite)
    registry = default_registry()
    work, lines = count_work(suite, registry)
    rates = [throughput(suite, registry, args.repeats)]
    print(f"suite {args.suite}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print("unavoidable work:")
    for line in lines:
        print(f"  - {line}")
    runs: dict[str, tuple[float, float, int]] = {}
    for kind in [k.strip() for k in args.run.split(",") if k.strip()]:
        env = dict(os.environ)
        with tempfile.TemporaryDirectory(prefix="eeb-floor-") as tmp:
            if kind == "cold":
                env["EEBENCH_CACHE"] = str(Path(tmp) / "cache")
            out, boards = Path(tmp) / "run", Path(tmp) / "boards"
            if kind == "warm" and args.warm_out:
                out, boards = Path(args.warm_out), Path(args.leaderboards or boards)
                if (out / "cells").exists() and any((out / "cells").iterdir()):
                    parser.error(f"--warm-out {out} already holds cells; expected a fresh run directory")
            runs[kind] = timed_process(eebench_command("run", args.suite, "--out", str(out),
                                                       "--leaderboards", str(boards)), env)
    if runs:
        rates.append(throughput(suite, registry, args.repeats))
    forward_rate = max(r[0] for r in rates)
    training_rate = max(r[1] for r in rates)
    floor = work.forward / forward_rate + work.training / training_rate
    base = work.base_forward / forward_rate + work.base_training / training_rate
    measured = "; ".join(f"{f:,.0f} forward/s and {t:,.0f} training samples/s" for f, t in rates)
    print(f"throughput (before{' / after the runs' if runs else ''}): {measured}; the faster is used")
    print(f"floor: {work.forward:,.0f} forward samples / {forward_rate:,.0f} per s + {work.training:,.0f} training "
          f"samples / {training_rate:,.0f} per s = {floor:,.0f} s warm; + base backbone {base:,.0f} s cold")
    print()
    print("| run | wall | floor | ratio | peak RSS | exit |")
    print("|---|---|---|---|---|---|")
    for kind, (wall, rss, code) in runs.items():
        target = floor if kind == "warm" else floor + base
        print(f"| {kind} | {wall:,.0f} s | {target:,.0f} s | {wall / target:.2f} | {rss:.2f} GiB | {code} |")
    if args.cli:
        print()
        print(cli_timings(args.suite, args.repeats))
    return 0


def cli_timings(suite_path: str, repeats: int) -> str:
    """Median wall time and peak RSS of the commands that should be instant, as whole processes."""
    rows = ["| command | median wall | peak RSS |", "|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="eeb-cli-") as tmp:
        resume = ["run", "suites/smoke.yaml", "--out", str(Path(tmp) / "run"), "--leaderboards", str(Path(tmp) / "b")]
        subprocess.run(eebench_command(*resume), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for args in (["--help"], ["plugins"], ["validate", suite_path], resume):
            samples = [timed_process(eebench_command(*args), dict(os.environ)) for _ in range(repeats)]
            wall = statistics.median(s[0] for s in samples)
            rows.append(f"| `eebench {' '.join(args[:2])}{' (resume, nothing to do)' if args is resume else ''}` | "
                        f"{wall:.2f} s | {max(s[1] for s in samples):.2f} GiB |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
