"""Paper claims checked against eebench's own results: ``eebench claims RUN_DIR...``.

The claims are data (``suites/claims.yml``): each names the paper's figure or table and setting, the
suites and methods (leaderboard labels, the results' ``method`` field) it is measured on, and one check
of a small set of generic kinds:

* ``beats``: the method's accuracy at each φ is at least each other method's (+ ``margin`` points);
* ``keeps``: the method's accuracy at each φ (``require: all``) or some φ (``require: any``) is within
  ``tolerance`` points of a reference: its own hull end, its all-exits-off network, or the plain backbone;
* ``saves``: the calibration-chosen operating point at cost ``max_cost`` (the most accurate one on the
  calibration split that costs at most that) loses at most ``max_drop`` points against the reference.

Every number is a test-split number of a policy chosen on the calibration split (``accuracy_at``, the hull's
vertices); with several seeds the mean is used and ``n`` shown. A claim whose suite or method is absent from
the run directories read is "not measured here". The module imports pydantic and PyYAML only (no torch).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import eebench
from eebench.errors import EebenchError
from eebench.params import location
from eebench.results import load_failures, load_results
from eebench.suite import _suite_detail, decode_yaml, parse_yaml

HOLDS = "holds"
FAILS = "does not hold"
UNMEASURED = "not measured here"
MAX_CLAIMS_BYTES = 1 << 20
_EPS = 1e-9  # points: comparisons on unrounded means, with a float-noise allowance

Text = Annotated[str, Field(min_length=1, max_length=2000)]
Label = Annotated[str, Field(min_length=1, max_length=200)]
Target = Annotated[float, Field(gt=0, le=100)]
Reference = Literal["hull_end", "no_exit", "backbone"]
REFERENCE_TEXT = {"hull_end": "its hull end", "no_exit": "its all-exits-off network", "backbone": "the plain backbone"}
KINDS = ("beats", "keeps", "saves")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _targets(value: list[float]) -> list[float]:
    twice = sorted({t for t in value if value.count(t) > 1})
    if twice:
        raise ValueError(f"target {twice[0]:g} appears twice; expected distinct cost targets")
    return sorted(value)


class Beats(_Strict):
    """``method``'s mean test accuracy at every φ in ``targets`` is ≥ each of ``others``' + ``margin`` points."""

    kind: Literal["beats"]
    method: Label
    others: list[Label] = Field(min_length=1)
    targets: list[Target] = Field(min_length=1)
    margin: float = Field(0.0, ge=-100, le=100)  # points the method must lead by (negative: a tolerance)
    # a competitor with no calibrated point at φ (its cheapest policy costs more): the method wins there, or
    # that φ is not compared with it
    unreachable: Literal["wins", "skip"] = "wins"

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, value: list[float]) -> list[float]:
        return _targets(value)

    @model_validator(mode="after")
    def _distinct(self) -> Beats:
        if self.method in self.others:
            raise ValueError(f"'{self.method}' is both the method and one of the others; expected other methods")
        twice = sorted({o for o in self.others if self.others.count(o) > 1})
        if twice:
            raise ValueError(f"'{twice[0]}' appears twice in others; expected distinct methods")
        return self

    @property
    def methods(self) -> list[str]:
        return [self.method, *self.others]

    def describe(self) -> str:
        lead = f" + {self.margin:g} pts" if self.margin > 0 else (f" − {-self.margin:g} pts" if self.margin < 0 else "")
        return (f"beats: {self.method} ≥ {', '.join(self.others)}{lead} at φ ∈ {{{_phis(self.targets)}}}"
                + ("" if self.unreachable == "wins" else "; a competitor without a point at φ is not compared"))


class Keeps(_Strict):
    """``method``'s mean test accuracy at φ is within ``tolerance`` points of ``reference`` (all or any φ)."""

    kind: Literal["keeps"]
    method: Label
    targets: list[Target] = Field(min_length=1)
    reference: Reference = "hull_end"
    tolerance: float = Field(2.0, ge=0, le=100)  # points
    require: Literal["all", "any"] = "all"

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, value: list[float]) -> list[float]:
        return _targets(value)

    @property
    def methods(self) -> list[str]:
        return [self.method]

    def describe(self) -> str:
        which = "every" if self.require == "all" else "some"
        return (f"keeps: {self.method} within {self.tolerance:g} pts of {REFERENCE_TEXT[self.reference]} at {which} "
                f"φ ∈ {{{_phis(self.targets)}}} the suite has")


class Saves(_Strict):
    """The calibration-chosen point at cost ``max_cost`` loses ≤ ``max_drop`` points against ``reference``."""

    kind: Literal["saves"]
    method: Label
    max_cost: float = Field(gt=0, le=100)
    max_drop: float = Field(ge=0, le=100)  # points
    reference: Reference = "no_exit"
    cost_tolerance: float = Field(0.01, ge=0, le=1)  # how far the point's test cost may exceed max_cost

    @property
    def methods(self) -> list[str]:
        return [self.method]

    def describe(self) -> str:
        saved = 100 * (1 - self.max_cost)
        return (f"saves: {self.method}'s calibrated point at cost ≤ {self.max_cost:g} ({saved:.0f} % saved) within "
                f"{self.max_drop:g} pts of {REFERENCE_TEXT[self.reference]}")


Check = Annotated[Beats | Keeps | Saves, Field(discriminator="kind")]


class PaperSetting(_Strict):
    source: Text  # where the paper says it: "E²CM paper, Fig. 2"
    says: Text  # what it reports, in a sentence
    dataset: Text
    backbone: Text
    budget: Text


class Claim(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    title: Text
    paper: PaperSetting
    suites: list[Label] = Field(min_length=1)  # suite names (the results' "suite" field)
    check: Check


class ClaimsFile(_Strict):
    claims: list[Claim] = Field(min_length=1)
    notes: list[Text] = Field(default_factory=list)

    @field_validator("claims")
    @classmethod
    def _ids(cls, value: list[Claim]) -> list[Claim]:
        ids = [c.id for c in value]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"claim id '{twice[0]}' appears twice; expected distinct ids")
        return value


def _phis(targets: list[float]) -> str:
    return ", ".join(f"{t:g}" for t in targets)


# ---------------------------------------------------------------------------------------- loading


def _claims_key(loc: tuple[Any, ...]) -> str:
    """A pydantic location without the discriminator's tag: ``claims[0].check.margin``."""
    parts = list(loc)
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "check" and parts[i] in KINDS:
            del parts[i]
    return location(parts) or "(top level)"


def _claims_detail(error: dict[str, Any]) -> tuple[str, str]:
    kind, loc = error["type"], tuple(error["loc"])
    if kind == "union_tag_not_found":
        return _claims_key(loc) + ".kind", f"required key is missing; expected one of {', '.join(KINDS)}"
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag")
        return _claims_key(loc) + ".kind", f"unknown check kind {tag!r}; expected one of {', '.join(KINDS)}"
    if kind == "string_pattern_mismatch" and loc[-1:] == ("id",):
        return _claims_key(loc), (f"expected 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or "
                                  f"digit (input: {error.get('input')!r})")
    return _claims_key(loc), _suite_detail(error)


def load_claims(path: str | Path) -> ClaimsFile:
    """Parse and validate a claims file (safe YAML, no duplicate keys); a problem is one line naming file and key."""
    path = Path(path)
    where = str(path)
    try:
        data = path.read_bytes() if path.is_file() else None
    except OSError as exc:
        raise EebenchError(f"cannot read the claims file ({exc.strerror or exc}); expected a readable YAML file",
                           where=where) from exc
    if data is None:
        raise EebenchError("no such claims file; expected a YAML file (see suites/claims.yml)", where=where,
                           key="--claims")
    if len(data) > MAX_CLAIMS_BYTES:
        raise EebenchError(f"the file is {len(data):,} bytes; expected at most {MAX_CLAIMS_BYTES:,} bytes",
                           where=where, key="(file size)")
    raw = parse_yaml(decode_yaml(data, where), where, "a claims file")
    if not isinstance(raw, dict):
        raise EebenchError("expected a mapping with the key 'claims' (a list of claims)", where=where,
                           key="(top level)")
    try:
        return ClaimsFile.model_validate(raw)
    except ValidationError as exc:
        key, detail = _claims_detail(exc.errors()[0])
        raise EebenchError(detail, where=where, key=key) from exc


# ---------------------------------------------------------------------------------------- results


@dataclass
class Runs:
    """Finished results (and failed-cell records) of several run directories; a later directory's result
    replaces an earlier one's of the same (suite, dataset, backbone, method, budget, seed)."""

    results: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    read: list[tuple[str, int, int, list[str]]]  # (run dir, results, failed cells, suites)
    replaced: int = 0


def _identity(result: dict[str, Any]) -> tuple:
    budget = result.get("budget") or {}
    return (result.get("suite"), result.get("dataset"), result.get("backbone"), result.get("method"),
            budget.get("name"), repr(sorted((budget.get("params") or {}).items())), result.get("seed"))


def load_runs(run_dirs: list[Path]) -> Runs:
    kept: dict[tuple, dict[str, Any]] = {}
    failed: dict[tuple, dict[str, Any]] = {}
    read = []
    replaced = 0
    for run_dir in run_dirs:
        if not (run_dir / "cells").is_dir():
            raise EebenchError("no cells/ folder; expected a run directory written by 'eebench run'",
                               where=str(run_dir), key="RUN_DIR")
        results, failures = load_results(run_dir), load_failures(run_dir)
        for result in results:
            replaced += _identity(result) in kept
            kept[_identity(result)] = result
            failed.pop(_identity(result), None)
        for failure in failures:
            if _identity(failure) not in kept:
                failed[_identity(failure)] = failure
        suites = sorted({str(r.get("suite")) for r in [*results, *failures]})
        read.append((str(run_dir), len(results), len(failures), suites))
    return Runs(list(kept.values()), list(failed.values()), read, replaced)


def _accuracy(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else entry["accuracy"]


def reference_accuracy(result: dict[str, Any], reference: str) -> float | None:
    if reference == "backbone":
        return result.get("backbone_test_accuracy")
    block = result.get(reference) or {}
    return block.get("test_accuracy")


def policy_at(result: dict[str, Any], cost: float) -> tuple[float, float, str] | None:
    """(test accuracy, test cost, how) of the calibration-chosen policy at φ = ``cost``, or None when the method
    cannot run that cheaply. A suite target reads the result's evaluated policy (``accuracy_at``); another cost
    takes the same rule (eebench.policy) from the calibration hull: a vertex, or the time-sharing mixture of the
    two vertices whose calibration cost interpolates to it, whose test numbers are then the mixture's expected
    values (the vertices' test numbers weighted alike)."""
    key = f"{cost:g}"
    if key in result["accuracy_at"]:
        entry = result["accuracy_at"][key]
        return None if entry is None else (entry["accuracy"], entry["test_cost"], "evaluated policy")
    curve = result["curve"]
    cal = [float(c) for c in curve["calibration"]["cost"]]
    test_cost, test_acc = curve["test"]["cost"], curve["test"]["accuracy"]
    if not cal or cost < cal[0] - 1e-12:
        return None
    if cost >= cal[-1] - 1e-12:
        return test_acc[-1], test_cost[-1], "hull vertex"
    for k, c in enumerate(cal):
        if abs(c - cost) <= 1e-12:
            return test_acc[k], test_cost[k], "hull vertex"
    low = max(k for k, c in enumerate(cal) if c < cost)
    w = (cost - cal[low]) / (cal[low + 1] - cal[low])
    return ((1 - w) * test_acc[low] + w * test_acc[low + 1], (1 - w) * test_cost[low] + w * test_cost[low + 1],
            "hull mixture, expected value")


# ---------------------------------------------------------------------------------------- checks


@dataclass
class Mean:
    """A mean over seeds; ``value`` None when any seed has no number; ``available`` False when the suite lacks
    the target altogether."""

    value: float | None
    n: int
    available: bool = True

    def pct(self) -> str:
        if not self.available:
            return "n/a"
        return "—" if self.value is None else f"{100 * self.value:.1f}%"


def _mean(values: list[float | None]) -> Mean:
    if not values:
        return Mean(None, 0, False)
    if any(v is None for v in values):
        return Mean(None, len(values))
    return Mean(statistics.mean(values), len(values))


def mean_at(rows: list[dict[str, Any]], target: float) -> Mean:
    key = f"{target:g}"
    if not rows or any(key not in r["accuracy_at"] for r in rows):
        return Mean(None, len(rows), False)
    return _mean([_accuracy(r["accuracy_at"][key]) for r in rows])


def _pts(value: float) -> str:
    return f"{value:+.1f} pts"


@dataclass
class Outcome:
    verdict: str
    measured: str
    reason: str  # the full why, in the details
    table: list[str] = field(default_factory=list)
    short: str | None = None  # the why in the summary table (default: ``reason``)


def check_beats(check: Beats, by_method: dict[str, list[dict[str, Any]]]) -> Outcome:
    mine = by_method.get(check.method, [])
    present = [o for o in check.others if by_method.get(o)]
    missing = [o for o in check.others if not by_method.get(o)]
    losses: list[tuple[float, str]] = []  # (lead in points, text)
    compared, parts = 0, []
    table = [f"| φ | {' | '.join(check.methods)} |", "|---" * (len(check.methods) + 1) + "|"]
    for t in check.targets:
        a = mean_at(mine, t)
        others = {o: mean_at(by_method[o], t) for o in present}
        table.append(f"| {t:g} | {a.pct()} | " + " | ".join(
            others[o].pct() if o in others else "absent" for o in check.others) + " |")
        if not a.available:
            continue
        parts.append(f"φ={t:g}: {check.method} {a.pct()} vs " + ", ".join(f"{o} {m.pct()}" for o, m in others.items()))
        for o, b in others.items():
            if not b.available or (a.value is None and b.value is None):
                continue
            if a.value is None:
                compared += 1
                losses.append((-100.0, f"at φ={t:g} {check.method} has no calibrated point, {o} {b.pct()}"))
            elif b.value is None:
                compared += check.unreachable == "wins"
            else:
                compared += 1
                lead = 100 * (a.value - b.value)
                if lead < check.margin - _EPS:
                    losses.append((lead, f"at φ={t:g} {check.method} {a.pct()} vs {o} {b.pct()} ({_pts(lead)})"))
    measured = "; ".join(parts) or "—"
    if losses:
        lost = f"{len(losses)} of {compared} comparisons lost"
        worst = min(losses, key=lambda loss: loss[0])[1]
        return Outcome(FAILS, measured, f"{lost}: " + "; ".join(text for _, text in losses), table,
                       short=f"{lost}; worst {worst}")
    if compared == 0:
        return Outcome(UNMEASURED, measured, "no φ where the methods have calibrated points to compare", table)
    if missing:
        return Outcome(UNMEASURED, measured, f"won all {compared} comparisons made, but {', '.join(missing)} "
                       "is absent from these results", table)
    return Outcome(HOLDS, measured, f"won all {compared} comparisons (margin {check.margin:g} pts)", table)


def _reference(check: Keeps | Saves, rows: list[dict[str, Any]]) -> Mean:
    return _mean([reference_accuracy(r, check.reference) for r in rows])


def check_keeps(check: Keeps, by_method: dict[str, list[dict[str, Any]]]) -> Outcome:
    rows = by_method[check.method]
    ref = _reference(check, rows)
    ref_text = f"{REFERENCE_TEXT[check.reference]} {ref.pct()}"
    table = ["| φ | accuracy | vs reference | test cost |", "|---|---|---|---|"]
    if ref.value is None:
        return Outcome(UNMEASURED, ref_text, f"{REFERENCE_TEXT[check.reference]} has no accuracy in these results")
    kept: list[str] = []
    lost: list[str] = []
    parts: list[str] = []
    worst: tuple[float, str] | None = None
    for t in check.targets:
        a = mean_at(rows, t)
        if not a.available:
            table.append(f"| {t:g} | not a target of the suite | | |")
            continue
        if a.value is None:
            table.append(f"| {t:g} | — (no calibrated point this cheap) | | |")
            parts.append(f"φ={t:g}: —")
            lost.append(f"φ={t:g} (no calibrated point)")
            continue
        delta = 100 * (a.value - ref.value)
        cost = statistics.mean(r["accuracy_at"][f"{t:g}"]["test_cost"] for r in rows)
        table.append(f"| {t:g} | {a.pct()} | {_pts(delta)} | {cost:.3f} |")
        parts.append(f"φ={t:g}: {a.pct()} ({_pts(delta)})")
        (kept if -delta <= check.tolerance + _EPS else lost).append(f"φ={t:g} ({_pts(delta)})")
        if worst is None or delta < worst[0]:
            worst = (delta, f"{_pts(delta)} at φ={t:g}")
    measured = f"{ref_text}; " + "; ".join(parts) if parts else ref_text
    if not kept and not lost:
        return Outcome(UNMEASURED, measured, f"none of φ ∈ {{{_phis(check.targets)}}} is a target of the suite", table)
    holds = not lost if check.require == "all" else bool(kept)
    if holds:
        reason = f"within {check.tolerance:g} pts at " + ", ".join(kept)
    else:
        reason = (f"more than {check.tolerance:g} pts below at " + ", ".join(lost) if check.require == "all"
                  else f"more than {check.tolerance:g} pts below at every φ: " + ", ".join(lost))
    checked = len(kept) + len(lost)
    short = None
    if not holds and worst is not None:
        short = f"more than {check.tolerance:g} pts below at {len(lost)} of {checked} φ; worst {worst[1]}"
    return Outcome(HOLDS if holds else FAILS, measured, reason, table, short=short)


def check_saves(check: Saves, by_method: dict[str, list[dict[str, Any]]]) -> Outcome:
    rows = by_method[check.method]
    ref = _reference(check, rows)
    ref_text = f"{REFERENCE_TEXT[check.reference]} {ref.pct()}"
    if ref.value is None:
        return Outcome(UNMEASURED, ref_text, f"{REFERENCE_TEXT[check.reference]} has no accuracy in these results")
    points = [policy_at(r, check.max_cost) for r in rows]
    table = ["| seed | accuracy | test cost | how |", "|---|---|---|---|"]
    table += [f"| {r['seed']} | " + (f"{100 * p[0]:.1f}% | {p[1]:.3f} | {p[2]} |" if p else
                                     "— | | no calibrated point this cheap |")
              for r, p in zip(rows, points, strict=True)]
    table += ["", _cheapest_within(check, rows, ref.value)]
    if any(p is None for p in points):
        return Outcome(FAILS, f"{ref_text}; no calibrated point at cost ≤ {check.max_cost:g}",
                       f"the cheapest calibrated point costs more than {check.max_cost:g}", table)
    acc = statistics.mean(p[0] for p in points)
    cost = statistics.mean(p[1] for p in points)
    drop = 100 * (ref.value - acc)
    how = sorted({p[2] for p in points})
    measured = (f"φ={check.max_cost:g} point: {100 * acc:.1f}% at test cost {cost:.3f} ({', '.join(how)}) vs "
                f"{ref_text}: drop {drop:.1f} pts")
    problems = []
    if drop > check.max_drop + _EPS:
        problems.append(f"drop {drop:.1f} pts > {check.max_drop:g}")
    if cost > check.max_cost + check.cost_tolerance + _EPS:
        problems.append(f"test cost {cost:.3f} > {check.max_cost:g} + {check.cost_tolerance:g}")
    if problems:
        return Outcome(FAILS, measured, "; ".join(problems), table)
    return Outcome(HOLDS, measured, f"drop {drop:.1f} ≤ {check.max_drop:g} pts at test cost {cost:.3f}", table)


def _cheapest_within(check: Saves, rows: list[dict[str, Any]], reference: float) -> str:
    """For information: per seed, the cheapest hull vertex whose *test* accuracy is within ``max_drop`` points of
    the reference (read off test, so no calibrated choice: it says how far the bound is from holding)."""
    found = []
    for r in rows:
        test = r["curve"]["test"]
        within = [(c, a) for c, a in zip(test["cost"], test["accuracy"], strict=True)
                  if 100 * (reference - a) <= check.max_drop + _EPS]
        found.append(f"seed {r['seed']}: " + (f"cost {min(within)[0]:.3f} ({100 * min(within)[1]:.1f}%)" if within
                                              else "none"))
    return (f"For information (read off the test split, not a calibrated choice): the cheapest hull vertex within "
            f"{check.max_drop:g} pts of the reference: {'; '.join(found)}.")


CHECKS: dict[str, Callable[[Any, dict[str, list[dict[str, Any]]]], Outcome]] = {
    "beats": check_beats, "keeps": check_keeps, "saves": check_saves}


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class Row:
    """One claim measured in one setting (suite, dataset, backbone, budget), or not measured at all."""

    number: int
    claim: Claim
    outcome: Outcome
    ours: str


def _setting(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    sizes = first.get("sizes") or {}
    size = f"; train/test {sizes['train']:,}/{sizes['test']:,}" if {"train", "test"} <= set(sizes) else ""
    return (f"suite {first['suite']}: {first['dataset']} · {first['backbone']} · {first['budget']['label']} · "
            f"n={len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds}{size}")


def _absent(claim: Claim, runs: Runs) -> str:
    method = claim.check.method
    in_suites = [r for r in runs.results if r.get("suite") in claim.suites]
    failed = [f for f in runs.failures if f.get("suite") in claim.suites and f.get("method") == method]
    suites = " / ".join(claim.suites)
    if failed:
        return f"every {method} cell of {suites} in these run directories failed"
    if not in_suites:
        return f"no results of suite {suites} in the run directories read"
    there = ", ".join(sorted({r["method"] for r in in_suites}))
    return f"no {method} results in suite {suites} (methods there: {there})"


def evaluate(claims: ClaimsFile, runs: Runs) -> list[Row]:
    rows = []
    for number, claim in enumerate(claims.claims, 1):
        check = claim.check
        settings: dict[tuple, list[dict[str, Any]]] = {}
        for r in runs.results:
            if r.get("suite") in claim.suites and r.get("method") in check.methods:
                key = (claim.suites.index(r["suite"]), r["dataset"], r["backbone"], r["budget"]["label"])
                settings.setdefault(key, []).append(r)
        measured = False
        for key in sorted(settings, key=lambda k: (k[0], *map(str, k[1:]))):
            group = settings[key]
            by_method: dict[str, list[dict[str, Any]]] = {}
            for r in sorted(group, key=lambda r: r["seed"]):
                by_method.setdefault(r["method"], []).append(r)
            if not by_method.get(check.method):
                continue
            measured = True
            outcome = CHECKS[check.kind](check, by_method)
            rows.append(Row(number, claim, outcome, _setting(by_method[check.method])))
        if not measured:
            rows.append(Row(number, claim, Outcome(UNMEASURED, "—", _absent(claim, runs)), "—"))
    return rows


# ---------------------------------------------------------------------------------------- report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(verdict: str) -> str:
    return f"**{verdict}**" if verdict != UNMEASURED else verdict


def render(rows: list[Row], claims: ClaimsFile, claims_path: Path, runs: Runs, command: str) -> str:
    counts = {v: sum(r.outcome.verdict == v for r in rows) for v in (HOLDS, FAILS, UNMEASURED)}
    lines = [
        "# Paper claims checked against eebench's results",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d} by `{command}` (eebench {eebench.__version__}) from the "
        f"claims declared in `{claims_path}`. {counts[HOLDS]} hold, {counts[FAILS]} do not hold, "
        f"{counts[UNMEASURED]} not measured here.",
        "",
        "Run directories read (finished results; failed cells are left out):",
        "",
    ]
    for run_dir, n, failed, suites in runs.read:
        lines.append(f"- `{run_dir}`: {n} result{'s' if n != 1 else ''}"
                     + (f", {failed} failed cell{'s' if failed != 1 else ''}" if failed else "")
                     + f" (suite {', '.join(suites) or '—'})")
    if runs.replaced:
        lines.append(f"- {runs.replaced} result(s) of an earlier directory replaced by a later one's (same suite, "
                     "dataset, backbone, method, budget and seed)")
    lines += [
        "",
        "| # | claim (paper) | check | measured here | verdict | our setting | paper's setting |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        claim, paper = row.claim, row.claim.paper
        lines.append("| " + " | ".join(_cell(x) for x in (
            str(row.number), f"{claim.title} ({paper.source})", claim.check.describe(), row.outcome.measured,
            _verdict(row.outcome.verdict) + f": {row.outcome.short or row.outcome.reason}", row.ours,
            f"{paper.dataset} · {paper.backbone} · {paper.budget}")) + " |")
    lines += ["", "## Details", ""]
    for row in rows:
        claim = row.claim
        lines += [f"### {row.number}. {claim.title} (`{claim.id}`)", "",
                  f"- Paper ({claim.paper.source}): {claim.paper.says}",
                  f"- Paper's setting: dataset {claim.paper.dataset}; backbone {claim.paper.backbone}; budget "
                  f"{claim.paper.budget}.",
                  f"- Ours: {row.ours}.",
                  f"- Check: {claim.check.describe()}.",
                  f"- Verdict: {_verdict(row.outcome.verdict)} ({row.outcome.reason}).", ""]
        if row.outcome.table:
            lines += [*row.outcome.table, ""]
    lines += [
        "## How the numbers are read",
        "",
        "- Accuracy at φ is each result's `accuracy_at[φ].accuracy`: the policy chosen on the calibration split "
        "at cost φ, evaluated on test (— when the method has no calibrated point that cheap; n/a when the suite "
        "does not have that target). With several seeds the mean is shown and used, and n is the seed count.",
        "- References: the hull end is the most accurate calibration vertex on test (`hull_end`), the "
        "all-exits-off network the method's own full-cost network (`no_exit`), the plain backbone the "
        "eebench-trained base network without exits (`backbone_test_accuracy`).",
        "- `saves` takes the policy at φ = its cost bound: the suite's evaluated policy when that is one of its "
        "targets, else the same calibration rule on the result's hull, whose test numbers are then the expected "
        "values of the two vertices' time-sharing.",
        "- A claim is not measured here when its suite or method is absent from the run directories read (or "
        "its cells failed), or when the results have none of the claim's targets.",
        *[f"- {note}" for note in claims.notes],
        "",
    ]
    return "\n".join(lines)


def write_report(run_dirs: list[Path], claims_path: Path, out: Path, command: str) -> tuple[Path, list[Row]]:
    claims = load_claims(claims_path)
    runs = load_runs(run_dirs)
    rows = evaluate(claims, runs)
    text = render(rows, claims, claims_path, runs, command)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise EebenchError(f"cannot write the report ({exc.strerror or exc}); expected a writable file",
                           where=str(out), key="--out") from exc
    return out, rows
