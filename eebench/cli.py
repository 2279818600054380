"""The ``eebench`` command: run, validate, plugins, leaderboard, export, bench, claims.

Exit codes: 0 everything done; 2 bad input (one line naming the file, the key and what was
expected, no traceback unless ``--debug``), Ctrl-C, another run holding the run directory, or a
parallel run's worker that died;
3 the run went through but some cells failed (each recorded in its cell file, shown as
"failed" in the leaderboard, computed again by the next run); 4 some finished results could not
be written (each said in one line; they are in this run's leaderboard only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from eebench.errors import EebenchError

if TYPE_CHECKING:  # the command line imports torch only when a command needs it
    import torch

    from eebench.executors import ExecutorSettings
    from eebench.plugins import Registry
    from eebench.runner import RunReport
    from eebench.suite import Suite

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CELLS_FAILED = 3
EXIT_NOT_SAVED = 4


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise EebenchError(f"unknown device '{name}'; expected cpu, cuda or cuda:N", where="command line",
                           key="--device") from exc
    if device.type not in ("cpu", "cuda"):
        raise EebenchError(f"unsupported device '{name}'; expected cpu, cuda or cuda:N", where="command line",
                           key="--device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EebenchError("CUDA is not available on this machine; expected cpu", where="command line",
                           key="--device")
    return device


def cmd_validate(args: argparse.Namespace) -> int:
    from eebench.plugins import default_registry
    from eebench.suite import check_plugins, expand, load_suite

    suite = load_suite(args.suite)
    check_plugins(suite, default_registry(), args.suite)
    print(f"{args.suite}: valid, {len(expand(suite))} cells")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from eebench.plugins import default_registry

    registry = default_registry()
    payload = [
        {"package": p.package, "version": p.version, "entry_point": p.entry_point, "hooks": p.hooks,
         "registered": p.registered}
        for p in registry.plugins
    ]
    print(json.dumps({"plugins": payload, "failed": registry.failures}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from eebench.errors import check_writable
    from eebench.executors import make_executor
    from eebench.leaderboard import slug
    from eebench.lock import run_lock
    from eebench.plugins import default_registry
    from eebench.progress import console
    from eebench.runner import run_suite
    from eebench.suite import check_plugins, load_suite

    suite = load_suite(args.suite)
    registry = default_registry()
    check_plugins(suite, registry, args.suite)

    run_dir = Path(args.out or suite.outputs.run_dir or f"runs/{suite.name}")
    board_dir = Path(args.leaderboards or suite.outputs.leaderboard_dir)
    check_writable(board_dir, "--leaderboards")
    check_writable(board_dir / slug(suite.name), "--leaderboards", "a writable folder for the leaderboard's figures")
    check_writable(run_dir, "--out")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = _device(args.device)
    settings = _executor_settings(args)
    executor = make_executor(settings, device, run_dir, suite.name)
    threads = torch.get_num_threads()
    if executor is None and settings.threads:
        torch.set_num_threads(settings.threads)  # a serial run's --threads, until the command ends
    log = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    try:
        # held across the run and the leaderboard: a second run waits (--wait) or refuses, never interleaves
        with run_lock(run_dir, wait=args.wait):
            report = run_suite(suite, registry, suite_path=args.suite, run_dir=run_dir, device=device,
                               only=args.only, log=log, share_activations=not args.no_shared_activations,
                               executor=executor)
            path = _render_run(args, suite, registry, run_dir, board_dir, device, report, log)
    except KeyboardInterrupt:
        print(f"eebench: interrupted: finished cells are kept in {run_dir}/cells; "
              "rerun the same command to resume", file=sys.stderr)
        return EXIT_USAGE
    finally:
        torch.set_num_threads(threads)  # main() called in-process (tests, notebooks) leaves torch as it was
    failed = f", {len(report.failed)} failed" if report.failed else ""
    print(f"{len(report.done)} cells run, {len(report.skipped)} reused{failed}, {report.seconds:.1f}s; "
          f"results in {run_dir}/cells; leaderboard {path}")
    if report.unsaved_finished:
        print(f"eebench: error: {len(report.unsaved_finished)} finished result(s) could not be written to "
              f"{run_dir}/cells (see the warnings above); they are only in the leaderboard {path}", file=sys.stderr)
        return EXIT_NOT_SAVED
    if report.failed:
        print(f"eebench: error: {len(report.failed)} cell(s) failed: {', '.join(report.failed)}; each error is in its "
              f"cell file under {run_dir}/cells and in the leaderboard; rerun to retry them", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return EXIT_OK


def _executor_settings(args: argparse.Namespace) -> ExecutorSettings:
    from eebench.executors import ExecutorSettings

    return ExecutorSettings(kind=args.executor, jobs=args.jobs, threads=args.threads, ray_address=args.ray_address,
                            cluster=args.submitit_cluster, slurm_partition=args.slurm_partition,
                            timeout_min=args.timeout_min, mem_gb=args.slurm_mem_gb)


def _render_run(args: argparse.Namespace, suite: Suite, registry: Registry, run_dir: Path, board_dir: Path,
                device: torch.device, report: RunReport, log: Callable[[str], None]) -> Path:
    """The run's latency block (when the suite has one) and its leaderboard, unless nothing it shows changed."""
    from eebench.board_state import record_board, unchanged_board
    from eebench.leaderboard import render
    from eebench.suite import expand

    command = f"eebench run {args.suite}"
    cell_ids = {cell.cell_id for cell in expand(suite)}
    if suite.latency is not None:
        from eebench.bench import bench_run

        settings = suite.latency
        bench_run(run_dir, registry, device, settings, settings.targets or suite.targets,
                  only=lambda r: r["cell_id"] in cell_ids and (r.get("latency") or {}).get("settings")
                  != settings.model_dump(), log=log)
    inputs = [suite.name, suite.targets, suite.description, command, suite.notes, sorted(cell_ids), suite.reference,
              suite.ztw_columns]
    path = None if report.unsaved else unchanged_board(run_dir, board_dir, suite.name, inputs)
    if path is None:  # something changed since this run directory's leaderboard was drawn: draw it again
        path = render(run_dir, board_dir, suite.name, suite.targets, suite.description, command, suite.notes,
                      cell_ids=cell_ids, extra=list(report.unsaved.values()), reference=suite.reference,
                      ztw_columns=suite.ztw_columns)
        if not report.unsaved:
            record_board(run_dir, board_dir, suite.name, inputs, path)
    return path


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from eebench.errors import check_writable
    from eebench.leaderboard import render

    run_dir = Path(args.run_dir)
    if not (run_dir / "cells").is_dir():
        raise EebenchError("no cells/ folder; expected a run directory written by 'eebench run'",
                           where=str(run_dir), key="RUN_DIR")
    check_writable(Path(args.leaderboards), "--leaderboards")
    from eebench.runner import read_run_suite

    suite, _ = read_run_suite(run_dir)  # the reference and ZTW columns of the suite last run there, if any
    if args.reference:
        from eebench.results import load_results

        labels = sorted({r["method"] for r in load_results(run_dir)})
        if args.reference not in labels:
            raise EebenchError(f"no result of a method labelled '{args.reference}'; expected one of "
                               f"{', '.join(labels) or '(no results)'}", where=str(run_dir), key="--reference")
    reference = args.reference or (suite.reference if suite else None)
    ztw = args.ztw or bool(suite and suite.ztw_columns)
    command = f"eebench leaderboard {args.run_dir}" + (f" --reference {args.reference}" if args.reference else "") \
        + (" --ztw" if args.ztw else "")
    path = render(run_dir, Path(args.leaderboards), command=command, reference=reference, ztw_columns=ztw)
    print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from eebench.export import run_table, write_table  # pandas, no torch

    run_dir = Path(args.run_dir)
    frame = run_table(run_dir)
    path = write_table(frame, Path(args.out) if args.out else run_dir / f"export.{args.format}", args.format)
    print(f"{len(frame)} rows ({frame['cell_id'].nunique()} cells × φ) written to {path}")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from eebench.claims import FAILS, HOLDS, UNMEASURED, write_report  # pydantic and PyYAML only: no torch

    run_dirs = [Path(d) for d in args.run_dirs]
    command = " ".join(["eebench claims", *args.run_dirs, "--claims", args.claims, "--out", args.out])
    path, rows = write_report(run_dirs, Path(args.claims), Path(args.out), command)
    counts = ", ".join(f"{v}: {sum(r.outcome.verdict == v for r in rows)}" for v in (HOLDS, FAILS, UNMEASURED))
    print(f"{len(rows)} claim rows ({counts}); report {path}")
    return 0


def _numbers(text: str | None, kind: type, key: str) -> list | None:
    """``1,256`` -> [1, 256]; one line naming the option when a value is not a number."""
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EebenchError(f"'{text}' is not a comma-separated list of {kind.__name__}s; expected e.g. "
                           f"{'1,256' if kind is int else '0.25,0.5'}", where="command line", key=key) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from eebench.bench import bench_run
    from eebench.errors import check_writable
    from eebench.leaderboard import render
    from eebench.plugins import default_registry
    from eebench.progress import console
    from eebench.runner import read_run_suite
    from eebench.suite import LatencySpec, expand

    run_dir = Path(args.run_dir)
    if not (run_dir / "cells").is_dir():
        raise EebenchError("no cells/ folder; expected a run directory written by 'eebench run'",
                           where=str(run_dir), key="RUN_DIR")
    suite, suite_path = read_run_suite(run_dir)
    base = (suite.latency if suite and suite.latency else LatencySpec()).model_dump()
    overrides = {"batch_sizes": _numbers(args.batch_sizes, int, "--batch-sizes"),
                 "targets": _numbers(args.targets, float, "--targets"), "samples": args.samples,
                 "batch1_samples": args.batch1_samples, "repeats": args.repeats, "threads": args.threads}
    try:
        settings = LatencySpec(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise EebenchError(f"{error['msg']}", where="command line",
                           key="--" + str(error["loc"][0]).replace("_", "-")) from None
    board_dir = Path(args.leaderboards or (suite.outputs.leaderboard_dir if suite else "leaderboards"))
    check_writable(board_dir, "--leaderboards")
    device = _device(args.device)
    targets = settings.targets or (suite.targets if suite else None)
    ids = {cell.cell_id for cell in expand(suite)} if suite else None
    timed = bench_run(run_dir, default_registry(), device, settings, targets,
                      only=None if ids is None else (lambda r: r["cell_id"] in ids),
                      log=lambda line: console.print(line, markup=False, highlight=False))
    options = "".join(f" --{name.replace('_', '-')} {value}" for name, value in vars(args).items()
                      if name in overrides and value is not None)
    options += f" --device {args.device}" if args.device != "cpu" else ""
    bench_command = f"eebench bench {args.run_dir}{options}"
    command = f"eebench run {suite_path} && {bench_command}" if suite else bench_command
    path = render(run_dir, board_dir, suite.name if suite else None, suite.targets if suite else None,
                  suite.description if suite else "", command, suite.notes if suite else None, cell_ids=ids,
                  reference=suite.reference if suite else None, ztw_columns=bool(suite and suite.ztw_columns))
    print(f"{len(timed)} cells timed; results in {run_dir}/cells; leaderboard {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eebench", description="Fair benchmarks of early-exit methods.",
        epilog="exit codes: 0 done; 2 bad input, Ctrl-C or a run directory in use by another run (one line, "
               "finished cells kept); 3 some cells failed (recorded, shown as failed, retried by the next run); "
               "4 some results could not be written")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # --debug also after the subcommand; SUPPRESS keeps a subcommand from resetting the top-level flag
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run a suite and write its leaderboard")
    run.add_argument("suite")
    run.add_argument("--out", help="run directory (default runs/<suite name>)")
    run.add_argument("--leaderboards", help="leaderboard directory (default from the suite: leaderboards)")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--only", help="glob over cell ids, e.g. '*e2cm*'")
    run.add_argument("--no-shared-activations", action="store_true",
                     help="every frozen-backbone method pays its own activation pass (for benchmarking)")
    run.add_argument("--wait", action="store_true",
                     help="when another run holds the run directory, wait for it (default: refuse, exit 2)")
    parallel = run.add_argument_group(
        "running in parallel",
        "Cells sharing a base backbone (same dataset, backbone, recipe, seed) form a group that runs in one worker, "
        "so the shared activations are still computed once; results land in RUN_DIR/cells as each cell finishes. "
        "Numbers equal a serial run's at the same --threads (CPU float reductions depend on the thread count).")
    parallel.add_argument("--jobs", type=int, metavar="N",
                          help="groups at once: N local worker processes (default 1: this process); with ray, at "
                               "most N tasks in flight; with submitit, the SLURM array's parallelism")
    parallel.add_argument("--threads", type=int, metavar="T",
                          help="torch threads per worker, and the CPUs each Ray task or SLURM job asks for "
                               "(default: the cores divided among the workers, max(1, cores // N), where cores is "
                               "torch's own default thread count; a serial run keeps torch's default; ray and "
                               "submitit without --jobs: 1)")
    parallel.add_argument("--executor", choices=("local", "ray", "submitit"), default="local",
                          help="local processes (default), Ray tasks (pip install 'eebench[ray]'), or SLURM jobs "
                               "through submitit (pip install 'eebench[slurm]')")
    parallel.add_argument("--ray-address", metavar="ADDR",
                          help="a running Ray cluster (default: start a local Ray instance)")
    parallel.add_argument("--submitit-cluster", choices=("slurm", "local"),
                          help="submitit's backend: slurm (default) or local (processes on this machine)")
    parallel.add_argument("--slurm-partition", help="SLURM partition of the jobs")
    parallel.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory per SLURM job")
    parallel.add_argument("--timeout-min", type=int, metavar="MIN",
                          help="time limit of each SLURM job, minutes (default 720); logs in RUN_DIR/submitit")
    run.set_defaults(func=cmd_run)
    validate = sub.add_parser("validate", parents=[common], help="check a suite file without running it")
    validate.add_argument("suite")
    validate.set_defaults(func=cmd_validate)
    plugins = sub.add_parser("plugins", parents=[common], help="list installed plugins as JSON")
    plugins.set_defaults(func=cmd_plugins)
    board = sub.add_parser("leaderboard", parents=[common], help="regenerate a leaderboard from a run directory")
    board.add_argument("run_dir")
    board.add_argument("--leaderboards", default="leaderboards")
    board.add_argument("--reference", help="method label to show paired differences against (default: the suite's)")
    board.add_argument("--ztw", action="store_true",
                       help="add accuracy at 25/50/75/100%% of the base cost (default: the suite's ztw_columns)")
    board.set_defaults(func=cmd_leaderboard)
    export = sub.add_parser("export", parents=[common],
                            help="write a run directory's results as one tidy table (one row per cell × φ)")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=("csv", "parquet", "json"), default="csv", help="default csv")
    export.add_argument("--out", help="output file (default RUN_DIR/export.<format>)")
    export.set_defaults(func=cmd_export)
    bench = sub.add_parser("bench", parents=[common],
                           help="time each finished cell's early-exit network (batch 1, batched) next to its MACs")
    bench.add_argument("run_dir")
    bench.add_argument("--batch-sizes", help="comma-separated, e.g. 1,256 (1 = one sample at a time)")
    bench.add_argument("--targets", help="φ policies to time, e.g. 0.25,0.5 (default: the suite's)")
    bench.add_argument("--samples", type=int, help="test samples streamed at batch sizes > 1 (0 = all; default 1024)")
    bench.add_argument("--batch1-samples", type=int, help="test samples streamed at batch 1 (default 300)")
    bench.add_argument("--repeats", type=int, help="timed passes per measurement (default 5)")
    bench.add_argument("--threads", type=int, help="torch CPU threads while timing (default: unchanged)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--leaderboards", help="leaderboard directory (default: the suite's, else leaderboards)")
    bench.set_defaults(func=cmd_bench)
    claims = sub.add_parser("claims", parents=[common],
                            help="check the papers' claims against saved results and write a markdown report")
    claims.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    claims.add_argument("--claims", default="suites/claims.yml", help="claims file (default suites/claims.yml)")
    claims.add_argument("--out", default="leaderboards/claims.md", help="report (default leaderboards/claims.md)")
    claims.set_defaults(func=cmd_claims)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EebenchError as exc:
        if args.debug:
            raise
        print(f"eebench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("eebench: interrupted", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
