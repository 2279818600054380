"""Markdown leaderboards and accuracy-cost figures from a run directory's cell results."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import eebench
from eebench.errors import EebenchError
from eebench.provenance import summary
from eebench.results import COLLAPSE_FACTOR, is_failure, load_failures, load_results
from eebench.suite import ZTW_TARGETS

PHI_RULE = (
    "Accuracy at φ is chosen on the **calibration** split alone and evaluated on test: on the upper convex "
    "hull of the calibration (cost, accuracy) points, φ on a vertex takes that vertex; φ between two adjacent "
    "vertices takes their time-sharing mixture whose calibration cost interpolates to exactly φ (each sample "
    "runs one of the two threshold vectors by a seeded, deterministic per-sample rule); φ beyond the most "
    "accurate vertex takes that vertex; φ below the cheapest vertex is — . No maximum over test anywhere; the "
    "cell shows that policy's test accuracy, and the table below it the test cost it paid; corner-only numbers "
    "stay in the result JSON (`accuracy_at[φ].corner`) for comparison. The hull end is the most accurate "
    "calibration vertex, evaluated on test."
)
INTERVAL_RULE = (
    "± is the half-width of a 95 % confidence interval and n the number of seeds: with n ≥ 2, the Student-t "
    "interval of the mean over seeds (each seed redraws the subsets, retrains the base backbone and refits the "
    "method); with n = 1, a percentile bootstrap over test samples (10,000 resamples), which covers the test "
    "split's sampling noise only. Paired differences against the suite's reference method pair each seed with "
    "the reference's result of the same seed on the same base backbone (Student-t over the seeds' differences; "
    "one seed: a paired bootstrap over test samples); **bold**: the interval excludes 0."
)
COST_RULE = (
    "Costs are MACs (one multiply-add = 1; FLOPs ≈ 2 × MACs): fvcore counts at batch 1 for the backbone's "
    "stages and every exit made of modules, and one table of MAC-equivalents in the core (`eebench.costs`) "
    "for the work fvcore cannot see (distances to class means, softmax, entropy, comparisons, pooling it "
    "skips), the same for every method. Every evaluated exit's overhead is paid, normalised to the plain "
    "backbone (= 1.00); a method that evaluates exits can cost more than 1.00."
)


def _fmt_interval(interval: Any, scale: float = 100.0, unit: str = "%", digits: int = 1, sign: str = "") -> str:
    """``mean ± half-width`` of an ``eebench.stats.Interval`` ("—" for a missing mean; the mean alone
    when there is no interval)."""
    if math.isnan(interval.mean):
        return "—"
    mean = f"{scale * interval.mean:{sign}.{digits}f}"
    if interval.half_width is None:
        return f"{mean}{unit}"
    return f"{mean} ± {scale * interval.half_width:.{digits}f}{unit}"


def _fmt(values: list[float], samples: list[int] | None = None) -> str:
    """Accuracies over seeds as mean ± 95 % CI (Student-t over seeds; one seed: bootstrap over its ``samples``
    test samples, when given)."""
    from eebench.stats import mean_interval

    if not values:
        return "—"
    return _fmt_interval(mean_interval(values, samples))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _row_label(result: dict[str, Any], many_budgets: bool) -> str:
    return f"{result['method']} ({result['budget']['label']})" if many_budgets else result["method"]


def mean_curve(curves: list[tuple[list[float], list[float]]], points: int = 200) -> tuple[list[float], list[float]]:
    """The mean of several (test cost, accuracy) curves, each linearly interpolated on a common
    cost grid over the range every curve covers (as the E²CM paper averages its runs)."""
    import numpy as np

    low = max(min(cost) for cost, _ in curves)
    high = min(max(cost) for cost, _ in curves)
    if high <= low:
        return [], []
    grid = np.linspace(low, high, points)
    values = []
    for cost, accuracy in curves:
        order = np.argsort(cost, kind="stable")
        values.append(np.interp(grid, np.asarray(cost)[order], np.asarray(accuracy)[order]))
    return grid.tolist(), np.mean(values, axis=0).tolist()


def _operating_marks(group: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(name, mean test cost, mean test accuracy) of each fixed operating point of a method."""
    names = dict.fromkeys(p["name"] for r in group for p in r.get("operating_points", []))
    marks = []
    for name in names:
        points = [p["test"] for r in group for p in r.get("operating_points", []) if p["name"] == name]
        marks.append((name, statistics.mean(p["cost"] for p in points), statistics.mean(p["accuracy"] for p in points)))
    return marks


def plot_curves(results: list[dict[str, Any]], targets: list[float], path: Path, title: str,
                many_budgets: bool) -> None:
    """Each method's test curve; with several seeds each seed faint and their mean bold. Fixed
    operating points get a vertical line at their cost and a marker (E²CM paper, Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, group) in enumerate(_group(results, lambda r: _row_label(r, many_budgets)).items()):
        colour = colours[index % len(colours)]
        curves = [(r["curve"]["test"]["cost"], [100 * a for a in r["curve"]["test"]["accuracy"]]) for r in group]
        if len(curves) == 1:
            ax.plot(*curves[0], marker=".", markersize=3, linewidth=1.2, color=colour, label=label)
        else:
            for cost, accuracy in curves:
                ax.plot(cost, accuracy, linewidth=0.8, color=colour, alpha=0.3)
            ax.plot(*mean_curve(curves), linewidth=2.2, color=colour, label=f"{label} (mean of {len(curves)} seeds)")
        for name, cost, accuracy in _operating_marks(group):
            ax.axvline(cost, color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
            ax.scatter([cost], [100 * accuracy], marker="D", s=22, color=colour, zorder=5)
            ax.annotate(name, (cost, 100 * accuracy), textcoords="offset points", xytext=(3, -10), fontsize=7)
    backbone = [r["backbone_test_accuracy"] for r in results if r["backbone_test_accuracy"] is not None]
    if backbone:
        ax.scatter([1.0], [100 * statistics.mean(backbone)], marker="*", s=120, color="black", zorder=5,
                   label="backbone (no early exit)")
    for t in targets:
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("cost (fraction of the plain backbone's MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _group(items: list[dict[str, Any]], key) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def _spend(group: list[dict[str, Any]]) -> str:
    spend = group[0]["spend"]
    seconds = statistics.mean(r["spend"]["seconds"] for r in group)
    extra = f" + {spend['extra_forward_samples']:,} fwd" if spend.get("extra_forward_samples") else ""
    return f"{spend['samples']:,} samples{extra}, {seconds:.1f} s"


def _failure_text(failure: dict[str, Any]) -> str:
    error = failure["error"]
    plugin = error.get("plugin") or {}
    text = (f"seed {failure['seed']}: {error.get('type', 'Error')}: {error.get('message', '')} "
            f"({plugin.get('kind', 'plugin')} '{plugin.get('name', '?')}' of {plugin.get('package', '?')}, "
            f"during {error.get('phase', '?')})")
    return text.replace("|", "\\|").replace("\n", " ")


def _failed_row(label: str, failures: list[dict[str, Any]], columns: list[float]) -> str:
    """A "failed" row: the cell (or seeds) of this method that raised, and why."""
    return (f"| {label} | " + " | ".join("failed" for _ in columns) + " | failed | "
            + "; ".join(_failure_text(f) for f in failures) + " |")


def render(run_dir: Path, leaderboard_dir: Path, suite_name: str | None = None,
           targets: list[float] | None = None, description: str = "", command: str = "",
           suite_notes: list[str] | None = None, cell_ids: set[str] | None = None,
           extra: list[dict[str, Any]] | None = None, reference: str | None = None,
           ztw_columns: bool = False) -> Path:
    """Write ``<leaderboard_dir>/<suite>.md`` and its figures; returns the markdown path.

    ``cell_ids`` limits the board to one suite's cells (``eebench run``); without it every newest
    result in the run directory is shown (``eebench leaderboard``). ``extra``: results of this run that
    could not be written (kept in memory), shown as if read from the run directory. Failed cells get a
    "failed" row naming the error and the plugin that raised it. ``reference``: the method label paired
    differences are shown against; ``ztw_columns``: add the accuracy at 25/50/75/100 % of the base cost."""
    results = load_results(run_dir, cell_ids)
    failures = load_failures(run_dir, cell_ids)
    if extra:
        replaced = {r.get("cell_id") for r in extra}
        results = [r for r in results if r.get("cell_id") not in replaced]
        failures = [f for f in failures if f.get("cell_id") not in replaced]
        results += [r for r in extra if not is_failure(r)]
        failures += [f for f in extra if is_failure(f)]
    if not results and not failures:
        raise EebenchError("no readable cell results; expected JSON files written by 'eebench run'",
                           where=str(run_dir / "cells"), key="RUN_DIR")
    try:
        return _render(results, failures, leaderboard_dir, suite_name, targets, description, command, suite_notes,
                       reference, ztw_columns)
    except OSError as exc:
        raise EebenchError(f"cannot write the leaderboard ({exc.strerror or exc}) at {exc.filename or leaderboard_dir}"
                           "; expected a writable directory", where=str(leaderboard_dir), key="--leaderboards") \
            from exc


def _render(results: list[dict[str, Any]], failures: list[dict[str, Any]], leaderboard_dir: Path,
            suite_name: str | None, targets: list[float] | None, description: str, command: str,
            suite_notes: list[str] | None, reference: str | None = None, ztw_columns: bool = False) -> Path:
    suite_name = suite_name or (results or failures)[0]["suite"]
    targets = targets or sorted({float(t) for r in results for t in r["accuracy_at"]}) or [1.0]
    many_budgets = len({r["budget"]["label"] for r in [*results, *failures]}) > 1
    columns = [*targets, 1.0] if 1.0 not in targets else targets
    first = (results or failures)[0]["provenance"]
    intervals = _intervals(results, sorted({*columns, *(ZTW_TARGETS if ztw_columns else ())}), reference)
    lines = [
        f"# Leaderboard: {suite_name}",
        "",
        *([description.strip(), ""] if description.strip() else []),
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d} by `{command or 'eebench leaderboard'}` "
        f"(eebench {eebench.__version__}, torch {first['torch']}, device {first['device']}).",
        "",
    ]
    failed_groups = _group(failures, lambda r: (r["dataset"], r["backbone"]))
    for (dataset, backbone), failed in failed_groups.items():
        if not any((r["dataset"], r["backbone"]) == (dataset, backbone) for r in results):
            lines += [f"## {dataset} · {backbone}", "", "Every cell of this dataset and backbone failed.", "",
                      "| method | " + " | ".join(f"φ={t:.2f}" for t in columns) + " | hull end: acc (cost) | error |",
                      "|---" * (len(columns) + 3) + "|"]
            lines += [_failed_row(label, rows, columns)
                      for label, rows in _group(failed, lambda r: _row_label(r, many_budgets)).items()]
            lines.append("")
    for (dataset, backbone), group in _group(results, lambda r: (r["dataset"], r["backbone"])).items():
        base_acc = [a for a in {r["seed"]: r["backbone_test_accuracy"] for r in group}.values()  # one per seed
                    if a is not None]
        seeds = sorted({r["seed"] for r in group})
        base_sizes = [r["sizes"]["test"] for r in {r["seed"]: r for r in group}.values()
                      if r["backbone_test_accuracy"] is not None]
        plain = (f"{_fmt(base_acc, base_sizes)} test accuracy" if base_acc else
                 "not trained by eebench (recipe epochs 0: the method trains it)")
        lines += [
            f"## {dataset} · {backbone}",
            "",
            f"Plain backbone: {plain} at {group[0]['backbone_macs'] / 1e6:.2f} M MACs; "
            f"seeds {seeds}; train/calibration/test sizes {group[0]['sizes']['train']:,}/"
            f"{group[0]['sizes']['calibration']:,}/{group[0]['sizes']['test']:,}; "
            f"calibration on the {group[0]['calibration_split']}.",
            "",
            _interval_line(group),
            "",
            "| method | " + " | ".join(f"φ={t:.2f}" for t in columns)
            + " | hull end: acc (cost) | training spend | n |",
            "|---" * (len(columns) + 4) + "|",
        ]
        for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
            cells = [_fmt_interval(intervals.at("accuracy", rows[0], t)) for t in columns]
            end = [r["hull_end"] for r in rows]
            end_cost = statistics.mean(e["test_cost"] for e in end)
            flag = " ⚠" if _collapsed(rows) else ""
            end_accuracy = _fmt([e["test_accuracy"] for e in end], [r["sizes"]["test"] for r in rows])
            lines.append(f"| {label}{flag} | " + " | ".join(cells)
                         + f" | {end_accuracy} ({end_cost:.2f}) | {_spend(rows)} | {len(rows)} |")
        for label, rows in _group(failed_groups.get((dataset, backbone), []),
                                  lambda r: _row_label(r, many_budgets)).items():
            lines.append(_failed_row(label, rows, columns))
        if base_acc:
            base = _fmt(base_acc, base_sizes)
            lines.append("| backbone (no early exit) | " + " | ".join(base if t >= 1.0 else "—" for t in columns)
                         + f" | {base} (1.00) | base recipe | {len(base_acc)} |")
        if any(_collapsed(rows) for rows in _group(group, lambda r: _row_label(r, many_budgets)).values()):
            lines += ["", f"⚠ an exit of this method collapsed: on its own it predicts at most {COLLAPSE_FACTOR:g} × "
                          "chance (see \"Each exit on its own\"), so its numbers measure a broken classifier, not the "
                          "method."]
        lines += _test_cost_table(group, many_budgets, columns)
        if ztw_columns:
            lines += _ztw_table(group, many_budgets, intervals, base_acc, base_sizes)
        if reference is not None:
            lines += _paired_table(group, many_budgets, columns, intervals, reference)
        lines += _metrics_table(group, many_budgets, columns)
        figure = leaderboard_dir / slug(suite_name) / f"{slug(dataset)}-{slug(backbone)}.png"
        plot_curves(group, targets, figure, f"{dataset} · {backbone}", many_budgets)
        lines += ["", f"![accuracy–cost curves]({figure.relative_to(leaderboard_dir).as_posix()})", ""]
        lines += _exit_table(group, many_budgets, targets)
        lines += _forced_exit_table(group, many_budgets)
        lines += _operating_point_table(group, many_budgets)
        lines += _speed_table(group, many_budgets)
    notes = sorted({r["notes"] for r in results if r.get("notes")})
    if failures:
        lines += ["## Failed cells", "",
                  f"{len(failures)} cell(s) raised an error; each is recorded in its cell file (with the traceback) "
                  "and computed again by the next `eebench run`:", ""]
        lines += [f"- `{f['cell_id']}`: {_failure_text(f)}" for f in failures] + [""]
    lines += ["## Notes", "", f"- {PHI_RULE}", f"- {COST_RULE}", f"- {INTERVAL_RULE}"]
    lines += [f"- {n}" for n in [*(suite_notes or []), *notes]] + [""]
    lines += [*summary([r.get("provenance") for r in results]), ""]
    path = leaderboard_dir / f"{slug(suite_name)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


@dataclass
class _Intervals:
    """The board's aggregated numbers (``eebench.stats``), by (dataset, backbone, method, budget, φ)."""

    accuracy: dict[tuple, Any]
    paired: dict[tuple, Any]

    def at(self, table: str, result: dict[str, Any], target: float) -> Any:
        from eebench.stats import Interval

        return getattr(self, table).get(_key(result, target), Interval(math.nan, 0))


def _key(result: dict[str, Any], target: float) -> tuple:
    return result["dataset"], result["backbone"], result["method"], result["budget"]["label"], float(f"{target:g}")


def _lookup(frame: Any) -> dict[tuple, Any]:
    from eebench.stats import KEYS, Interval

    def number(value: Any) -> float | None:
        return None if value is None or math.isnan(value) else float(value)

    return {tuple(row[k] for k in KEYS): Interval(row["mean"], int(row["n"]), number(row["ci_low"]),
                                                  number(row["ci_high"]), row["interval"] or None)
            for row in frame.to_dict("records")}


def _intervals(results: list[dict[str, Any]], targets: list[float], reference: str | None) -> _Intervals:
    """Test accuracy at every target with its interval, and paired differences against ``reference``."""
    from eebench.stats import aggregate, paired
    from eebench.tidy import table

    frame = table(results, targets, outcomes=reference is not None)
    return _Intervals(_lookup(aggregate(frame)), _lookup(paired(frame, reference)) if reference else {})


def _interval_line(group: list[dict[str, Any]]) -> str:
    """Which interval the ± of this table is (see INTERVAL_RULE)."""
    seeds = {len({r["seed"] for r in rows}) for rows in _group(group, lambda r: (r["method"], r["budget"]["label"]))
             .values()}
    kinds = []
    if any(n >= 2 for n in seeds):
        kinds.append("Student-t over the n seeds")
    if 1 in seeds:
        kinds.append("one seed: bootstrap over test samples")
    return f"Test accuracy, mean ± half-width of the 95 % confidence interval ({'; '.join(kinds)}); n: seeds."


def _ztw_table(group: list[dict[str, Any]], many_budgets: bool, intervals: _Intervals, base_acc: list[float],
               base_sizes: list[int]) -> list[str]:
    """Accuracy at 25/50/75/100 % of the base cost, the Zero-Time-Waste tables' columns."""
    lines = ["", "Accuracy at 25/50/75/100 % of the base cost (Zero-Time-Waste's table convention; the same "
                 "calibration-chosen policies as above, evaluated on test; mean ± 95 % CI):", "",
             "| method | " + " | ".join(f"{100 * t:.0f} %" for t in ZTW_TARGETS) + " | n |",
             "|---" * (len(ZTW_TARGETS) + 2) + "|"]
    for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
        cells = [_fmt_interval(intervals.at("accuracy", rows[0], t)) for t in ZTW_TARGETS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(rows)} |")
    if base_acc:
        base = _fmt(base_acc, base_sizes)
        lines.append("| backbone (no early exit) | " + " | ".join(base if t >= 1.0 else "—" for t in ZTW_TARGETS)
                     + f" | {len(base_acc)} |")
    return lines


def _paired_table(group: list[dict[str, Any]], many_budgets: bool, columns: list[float], intervals: _Intervals,
                  reference: str) -> list[str]:
    """Each method minus the reference at each φ (percentage points), bold where the CI excludes 0."""
    if not any(r["method"] == reference for r in group):
        return ["", f"Paired differences: the reference method '{reference}' has no result here."]
    lines = ["", f"Paired differences vs the reference {reference} (test accuracy of the method − {reference}'s, in "
                 "percentage points, at the same φ; each seed paired with the reference's run of the same seed on the "
                 "same base backbone; mean ± 95 % CI; **bold**: the CI excludes 0; n: pairs):", "",
             "| method | " + " | ".join(f"φ={t:.2f}" for t in columns) + " | n |", "|---" * (len(columns) + 2) + "|"]
    for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
        if rows[0]["method"] == reference:
            continue
        found = [intervals.at("paired", rows[0], t) for t in columns]
        cells = [f"**{text}**" if interval.excludes_zero else text
                 for interval, text in ((i, _fmt_interval(i, unit="", sign="+")) for i in found)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(i.n for i in found)} |")
    return lines


def _phi_entry(result: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The cell's calibration-chosen operating point at ``target`` (see PHI_RULE)."""
    return result["accuracy_at"].get(f"{target:g}")


def _metric_under(result: dict[str, Any], name: str, target: float) -> float | None:
    """A method's extra test metric of the same policy that gives its accuracy at ``target``."""
    entry = _phi_entry(result, target)
    return None if entry is None else entry.get("metrics", {}).get(name)


def _fmt_plain(values: list[float | None]) -> str:
    """A metric other than accuracy over seeds: the value, or mean ± 95 % CI (Student-t) for several seeds."""
    from eebench.stats import mean_interval

    if not values or None in values:
        return "—"
    return _fmt_interval(mean_interval(values), scale=1.0, unit="", digits=3)


def _metric_names(items: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for item in items for name in item.get("metrics", {})))


def _test_cost_table(group: list[dict[str, Any]], many_budgets: bool, columns: list[float]) -> list[str]:
    """The test cost each φ policy really paid (its calibration cost is φ, or less at the hull's ends)."""
    lines = ["", "Test cost of the same policies (normalised MACs; mean over seeds):", "",
             "| method | " + " | ".join(f"φ={t:.2f}" for t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
        cells = []
        for t in columns:
            entries = [_phi_entry(r, t) for r in rows]
            cells.append("—" if None in entries else f"{statistics.mean(e['test_cost'] for e in entries):.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _metrics_table(group: list[dict[str, Any]], many_budgets: bool, columns: list[float]) -> list[str]:
    """Extra test metrics a method reports (``ExitStrategy.extra_metrics``, e.g. NMI and ARI)
    at the same points as the accuracy table above."""
    names = _metric_names([r["curve"]["test"] for r in group])
    if not names:
        return []
    lines = ["", "Further test metrics at the same points (mean ± 95 % CI over seeds, Student-t):", "",
             "| method | metric | " + " | ".join(f"φ={t:.2f}" for t in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
        for name in names:
            cells = []
            for t in columns:
                values = [_metric_under(r, name, t) for r in rows]
                cells.append("—" if None in values else _fmt_plain(values))
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines


def _exit_shares(names: list[str], counts: list[int]) -> str:
    total = sum(counts) or 1
    return ", ".join(f"{n} {100 * c / total:.0f}%" for n, c in zip(names, counts, strict=True) if c)


def _operating_point_table(group: list[dict[str, Any]], many_budgets: bool) -> list[str]:
    """Fixed thresholds a method's paper reports (e.g. EENet's confidence > 0.5), on test."""
    rows = [(label, name, [p for r in results for p in r.get("operating_points", []) if p["name"] == name],
             results[0], [r["sizes"]["test"] for r in results for p in r.get("operating_points", [])
                          if p["name"] == name])
            for label, results in _group(group, lambda r: _row_label(r, many_budgets)).items()
            for name in dict.fromkeys(p["name"] for r in results for p in r.get("operating_points", []))]
    if not rows:
        return []
    metrics = _metric_names([p["test"] for _, _, points, _, _ in rows for p in points])
    lines = ["Operating points (fixed thresholds, not calibrated; test split; mean ± 95 % CI; exit "
             "distribution of the first seed):", "",
             "| method | operating point | accuracy | cost | " + "".join(f"{m} | " for m in metrics)
             + "exit distribution |", "|---" * (5 + len(metrics)) + "|"]
    for label, name, points, first, sizes in rows:
        cost = statistics.mean(p["test"]["cost"] for p in points)
        shares = _exit_shares(first["exits"]["names"], points[0]["test"]["exit_counts"])
        extra = "".join(f"{_fmt_plain([p['test'].get('metrics', {}).get(m) for p in points])} | " for m in metrics)
        accuracy = _fmt([p["test"]["accuracy"] for p in points], sizes)
        lines.append(f"| {label} | {name} | {accuracy} | {cost:.3f} | {extra}{shares} |")
    return [*lines, ""]


def _exit_table(group: list[dict[str, Any]], many_budgets: bool, targets: list[float]) -> list[str]:
    """Where test samples leave, at the largest target (first seed): the exit distribution."""
    target = max(targets)
    lines = [f"Exit distribution at φ={target:.2f} (share of test samples leaving at each exit, first seed):", ""]
    for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items():
        at = _phi_entry(rows[0], target)
        if not at:
            lines.append(f"- {label}: no calibrated point with cost ≤ {target:.2f}")
            continue
        counts = at["exit_counts"]
        lines.append(f"- {label}: {_exit_shares(rows[0]['exits']['names'], counts)}")
    return [*lines, ""]


def _collapsed(rows: list[dict[str, Any]]) -> list[str]:
    """Exits of any seed's result flagged collapsed (results before the flag existed have none)."""
    return list(dict.fromkeys(name for r in rows for name in r["exits"].get("collapsed", [])))


def _forced_exit_table(group: list[dict[str, Any]], many_budgets: bool) -> list[str]:
    """Each exit's own test accuracy with every sample forced to leave there (first seed), collapsed ones flagged."""
    entries = [(label, rows[0]) for label, rows in _group(group, lambda r: _row_label(r, many_budgets)).items()
               if "forced_test_accuracy" in rows[0]["exits"]]
    if not entries:
        return []
    chance = entries[0][1]["exits"]["chance"]
    lines = [f"Each exit on its own (test accuracy with every sample forced to leave there, first seed; chance "
             f"{100 * chance:.1f} %; ⚠ collapsed: at most {COLLAPSE_FACTOR:g} × chance):", ""]
    for label, result in entries:
        exits = result["exits"]
        names = exits["names"] if len(exits["names"]) == len(exits["forced_test_accuracy"]) else [
            f"exit {j}" for j in range(len(exits["forced_test_accuracy"]))]
        shown = [f"{n} {100 * a:.1f} %{' ⚠' if n in exits.get('collapsed', []) else ''}"
                 for n, a in zip(names, exits["forced_test_accuracy"], strict=True)]
        lines.append(f"- {label}: {', '.join(shown)}")
    return [*lines, ""]


def _latency_modes(rows: list[dict[str, Any]]) -> tuple[str | None, int | None]:
    """The batch-1 key and the largest batch size timed in ``rows``' latency blocks."""
    sizes = sorted({int(size) for r in rows for size in r["latency"]["backbone"]})
    batch1 = "batch1" if 1 in sizes else None
    larger = [size for size in sizes if size > 1]
    return batch1, (larger[-1] if larger else None)


def _speed(entries: list[dict[str, Any]], key: str | None) -> tuple[str, str]:
    """Mean measured speedup of a mode over seeds, and its ratio to the MAC speedup on the same samples."""
    timings = [e["modes"].get(key) for e in entries] if key else [None]
    if None in timings:
        return "—", "—"
    speedup = statistics.mean(t["speedup"] for t in timings)
    ratio = statistics.mean(t["speedup"] / t["mac_speedup"] for t in timings)
    return f"{speedup:.2f}×", f"{ratio:.2f}"


def _speed_table(group: list[dict[str, Any]], many_budgets: bool) -> list[str]:
    """Measured speed of each φ policy run as a real early-exit network (``eebench bench``), next to its MACs."""
    timed = [r for r in group if r.get("latency")]
    if not timed:
        return []
    batch1, larger = _latency_modes(timed)
    latency = timed[0]["latency"]
    hw, settings = latency["hardware"], latency["settings"]
    plain = latency["backbone"]
    base = []
    if batch1:
        base.append(f"{plain['1']['ms_per_sample']:.2f} ms per sample at batch 1")
    if larger:
        base.append(f"{plain[str(larger)]['samples_per_s']:,.0f} samples/s at batch {larger}")
    lines = ["", f"Measured speed (`eebench bench`; {hw['cpu']}, {hw['threads']} threads, device {hw['device']}; "
             f"median of {settings['repeats']} passes over the first {settings['batch1_samples']} test samples at "
             f"batch 1 and {settings['samples'] or 'all'} at larger batches; the plain backbone ran "
             f"{' and '.join(base)}). A speedup is the plain backbone's time per sample divided by the policy's, at "
             "the same batch size on the same samples; MAC speedup is 1 / the policy's normalised MACs on those "
             "samples; ratio = measured / MAC (1 = the MAC saving fully became time):", "",
             f"| method | φ | MAC speedup | batch 1 | ratio | batch {larger} compacted | ratio | "
             f"batch {larger} masked | ratio |", "|---" * 9 + "|"]
    for label, rows in _group(timed, lambda r: _row_label(r, many_budgets)).items():
        targets = sorted({t for r in rows for t in r["latency"]["policies"]}, key=float)
        for target in targets:
            entries = [r["latency"]["policies"].get(target) for r in rows]
            if None in entries:
                lines.append(f"| {label} | {float(target):.2f} | — (cannot run this cheaply) |  |  |  |  |  |  |")
                continue
            mac = statistics.mean(e["mac_speedup"] for e in entries)
            one, one_ratio = _speed(entries, batch1)
            compact, compact_ratio = _speed(entries, f"compact@{larger}" if larger else None)
            masked, masked_ratio = _speed(entries, f"masked@{larger}" if larger else None)
            lines.append(f"| {label} | {float(target):.2f} | {mac:.2f}× | {one} | {one_ratio} | {compact} | "
                         f"{compact_ratio} | {masked} | {masked_ratio} |")
    return [*lines, ""]
