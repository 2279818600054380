"""``eebench claims``: paper claims (suites/claims.yml) checked against real results.

The results are the smoke suite's real cell file, read as it is and copied with edited numbers (method,
suite, accuracies, seeds) to reach each verdict: holds, does not hold, not measured here.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from eebench.claims import FAILS, HOLDS, UNMEASURED, evaluate, load_claims, load_runs, policy_at
from eebench.cli import main
from eebench.results import load_results, save_cell

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "suites" / "claims.yml"
PAPER = {"source": "a paper, Table 1", "says": "it works", "dataset": "CIFAR-10", "backbone": "ResNet-152",
         "budget": "one epoch"}


@pytest.fixture(scope="module")
def real(smoke_run: Path) -> dict[str, Any]:
    """The smoke suite's E²CM result, as eebench wrote it."""
    (result,) = load_results(smoke_run / "run")
    return result


def derive(real: dict[str, Any], run_dir: Path, suite: str, method: str, at: dict[float, float | None],
           seed: int = 0, hull_end: float = 0.9, no_exit: float = 0.9, backbone: float | None = 0.9,
           curve: tuple[list[float], list[float], list[float]] | None = None) -> dict[str, Any]:
    """A copy of the real result under another suite/method/seed, with these test accuracies at these φ."""
    result = copy.deepcopy(real)
    result.update(suite=suite, method=method, seed=seed, backbone_test_accuracy=backbone,
                  cell_id=f"{suite}-{method}-s{seed}".replace(" ", "_"))
    template = next(e for e in real["accuracy_at"].values() if e is not None)
    result["accuracy_at"] = {f"{t:g}": None if a is None else {**template, "accuracy": a, "test_cost": t}
                             for t, a in at.items()}
    result["hull_end"]["test_accuracy"] = hull_end
    result["no_exit"]["test_accuracy"] = no_exit
    if curve is not None:
        cal, cost, acc = curve
        result["curve"]["calibration"]["cost"], result["curve"]["test"]["cost"] = cal, cost
        result["curve"]["test"]["accuracy"] = acc
    save_cell(run_dir, result["cell_id"], result)
    return result


def claims_file(path: Path, *checks: tuple[str, list[str], dict[str, Any]]) -> Path:
    payload = {"claims": [{"id": cid, "title": f"claim {cid}", "paper": PAPER, "suites": suites, "check": check}
                          for cid, suites, check in checks]}
    path.write_text(yaml.safe_dump(payload, allow_unicode=True))
    return path


def verdicts(path: Path, *run_dirs: Path) -> dict[str, list[Any]]:
    rows = evaluate(load_claims(path), load_runs(list(run_dirs)))
    out: dict[str, list[Any]] = {}
    for row in rows:
        out.setdefault(row.claim.id, []).append(row)
    return out


def verdict(rows: dict[str, list[Any]], cid: str) -> str:
    (row,) = rows[cid]
    return row.outcome.verdict


# ---------------------------------------------------------------------------------------- the shipped claims


def test_shipped_claims_file_declares_the_five_paper_claims() -> None:
    claims = load_claims(SHIPPED)
    kinds = {c.id: (c.check.kind, c.suites) for c in claims.claims}
    assert kinds == {
        "e2cm-one-epoch": ("beats", ["fixed_budget_1epoch"]),
        "e2cm-sdn-six-epochs": ("beats", ["fixed_budget_6epochs", "fixed_budget_6epochs_resnet56"]),
        "eenet-keeps-accuracy": ("keeps", ["fixed_budget_1epoch", "fixed_budget_6epochs"]),
        "class-exclusion-saves": ("saves", ["fixed_budget_1epoch"]),
        "e2cm-dec-saves": ("saves", ["unsupervised_dec"]),
    }
    for claim in claims.claims:  # the methods are the labels the shipped suites give them
        suites = [yaml.safe_load((ROOT / "suites" / f"{s}.yaml").read_text()) for s in claim.suites]
        labels = {m.get("label", m["name"]) for suite in suites for m in suite["methods"]}
        assert set(claim.check.methods) <= labels, claim.id


def test_shipped_claims_on_a_run_of_another_suite_are_not_measured(smoke_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "claims.md"
    assert main(["claims", str(smoke_run / "run"), "--claims", str(SHIPPED), "--out", str(out)]) == 0
    report = out.read_text()
    assert "not measured here: 5" in capsys.readouterr().out
    assert f"`{smoke_run / 'run'}`: 1 result (suite smoke)" in report
    summary = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(summary) == 5 and all(UNMEASURED in line for line in summary)
    assert "no results of suite fixed_budget_1epoch in the run directories read" in report


# ---------------------------------------------------------------------------------------- a real run


def test_real_result_end_to_end(real: dict[str, Any], smoke_run: Path, tmp_path: Path, capsys) -> None:
    """The smoke run's own numbers: the verdicts follow from its JSON, and the report shows them."""
    at_25, at_50 = real["accuracy_at"]["0.25"], real["accuracy_at"]["0.5"]
    assert at_25 is not None and at_50 is not None
    no_exit = real["no_exit"]["test_accuracy"]
    path = claims_file(
        tmp_path / "claims.yml",
        ("saves-loose", ["smoke"], {"kind": "saves", "method": "E²CM", "max_cost": 0.5, "max_drop": 100}),
        ("keeps-exact", ["smoke"], {"kind": "keeps", "method": "E²CM", "targets": [0.25], "reference": "no_exit",
                                    "tolerance": 0}),
        ("elsewhere", ["fixed_budget_1epoch"], {"kind": "keeps", "method": "E²CM", "targets": [0.25]}),
        ("no-sdn", ["smoke"], {"kind": "beats", "method": "SDN", "others": ["E²CM"], "targets": [0.25]}),
    )
    out = tmp_path / "report" / "claims.md"
    assert main(["claims", str(smoke_run / "run"), "--claims", str(path), "--out", str(out)]) == 0
    rows = verdicts(path, smoke_run / "run")
    assert verdict(rows, "saves-loose") == HOLDS
    assert verdict(rows, "keeps-exact") == (HOLDS if at_25["accuracy"] >= no_exit else FAILS)
    assert verdict(rows, "elsewhere") == UNMEASURED
    assert verdict(rows, "no-sdn") == UNMEASURED
    assert "no SDN results in suite smoke (methods there: E²CM)" in rows["no-sdn"][0].outcome.reason
    report = out.read_text()
    assert f"{100 * at_50['accuracy']:.1f}% at test cost {at_50['test_cost']:.3f} (evaluated policy)" in report
    assert f"{100 * at_25['accuracy']:.1f}%" in report and f"{100 * no_exit:.1f}%" in report
    assert "fashion-mnist · resnet20 · 1 epoch · n=1 seed [0]; train/test 1,000/1,000" in report
    assert "a paper, Table 1" in report and "CIFAR-10 · ResNet-152 · one epoch" in report
    holding = 1 + (verdict(rows, "keeps-exact") == HOLDS)
    assert f"holds: {holding}, does not hold: {2 - holding}, not measured here: 2" in capsys.readouterr().out


def test_saves_off_target_follows_the_calibration_rule(real: dict[str, Any]) -> None:
    """A cost that is not a suite target takes the same hull policy the run evaluated at a target: with the
    target's entry removed, the expected value of the mixture is close to the per-sample evaluated one."""
    entry = real["accuracy_at"]["0.5"]
    stripped = copy.deepcopy(real)
    del stripped["accuracy_at"]["0.5"]
    accuracy, cost, how = policy_at(stripped, 0.5)
    points = entry["points"]
    assert how == ("hull mixture, expected value" if len(points) == 2 else "hull vertex")
    test = real["curve"]["test"]
    if len(points) == 1:
        assert (accuracy, cost) == (test["accuracy"][points[0]], test["cost"][points[0]])
    else:
        low, high = points
        w = entry["weight"]
        assert accuracy == pytest.approx((1 - w) * test["accuracy"][low] + w * test["accuracy"][high])
        assert abs(accuracy - entry["accuracy"]) < 0.05 and abs(cost - entry["test_cost"]) < 0.05
    cheapest = real["curve"]["calibration"]["cost"][0]
    assert policy_at(stripped, cheapest / 2) is None
    assert policy_at(stripped, 50.0)[0] == test["accuracy"][-1]  # beyond the hull: the most accurate vertex


# ---------------------------------------------------------------------------------------- each verdict


@pytest.fixture
def edited_runs(real: dict[str, Any], tmp_path: Path) -> list[Path]:
    """Two run directories (a run directory holds one suite: it keeps the newest result per cell identity)."""
    run, run2 = tmp_path / "run", tmp_path / "run2"
    derive(real, run, "s1", "A", {0.25: 0.80, 0.5: 0.85, 1: 0.86}, hull_end=0.86, no_exit=0.90,
           curve=([0.2, 0.6, 0.9], [0.2, 0.6, 0.9], [0.5, 0.85, 0.9]))
    derive(real, run, "s1", "B", {0.25: 0.70, 0.5: 0.90, 1: 0.90})
    derive(real, run, "s1", "Slow", {0.25: None, 0.5: 0.80, 1: 0.90})
    derive(real, run2, "s2", "A", {0.25: 0.80, 0.5: 0.85, 1: 0.9}, seed=0)
    derive(real, run2, "s2", "A", {0.25: 0.90, 0.5: 0.85, 1: 0.9}, seed=1)
    derive(real, run2, "s2", "B", {0.25: 0.86, 0.5: 0.80, 1: 0.9}, seed=0)
    derive(real, run2, "s2", "B", {0.25: 0.86, 0.5: 0.80, 1: 0.9}, seed=1)
    return [run, run2]


BEATS = {"kind": "beats", "method": "A", "others": ["B"]}


def test_beats(edited_runs: list[Path], tmp_path: Path) -> None:
    path = claims_file(
        tmp_path / "c.yml",
        ("at-025", ["s1"], {**BEATS, "targets": [0.25]}),
        ("at-both", ["s1"], {**BEATS, "targets": [0.25, 0.5]}),
        ("margin", ["s1"], {**BEATS, "targets": [0.25], "margin": 15}),
        ("tolerant", ["s1"], {**BEATS, "targets": [0.5], "margin": -5}),
        ("unreachable-wins", ["s1"], {**BEATS, "others": ["Slow"], "targets": [0.25]}),
        ("unreachable-skip", ["s1"], {**BEATS, "others": ["Slow"], "targets": [0.25], "unreachable": "skip"}),
        ("cannot-run", ["s1"], {"kind": "beats", "method": "Slow", "others": ["B"], "targets": [0.25]}),
        ("absent-other", ["s1"], {**BEATS, "others": ["B", "Gone"], "targets": [0.25]}),
        ("absent-other-lost", ["s1"], {**BEATS, "others": ["B", "Gone"], "targets": [0.5]}),
        ("not-a-target", ["s1"], {**BEATS, "targets": [0.3]}),
        ("seed-means", ["s2"], {**BEATS, "targets": [0.25]}),
    )
    rows = verdicts(path, *edited_runs)
    assert verdict(rows, "at-025") == HOLDS
    assert verdict(rows, "at-both") == FAILS
    assert "at φ=0.5 A 85.0% vs B 90.0% (-5.0 pts)" in rows["at-both"][0].outcome.reason
    assert verdict(rows, "margin") == FAILS
    assert verdict(rows, "tolerant") == HOLDS
    assert verdict(rows, "unreachable-wins") == HOLDS
    assert verdict(rows, "unreachable-skip") == UNMEASURED
    assert verdict(rows, "cannot-run") == FAILS
    assert "Slow has no calibrated point" in rows["cannot-run"][0].outcome.reason
    assert verdict(rows, "absent-other") == UNMEASURED
    assert "Gone is absent" in rows["absent-other"][0].outcome.reason
    assert verdict(rows, "absent-other-lost") == FAILS
    assert verdict(rows, "not-a-target") == UNMEASURED
    (row,) = rows["seed-means"]  # A: mean of 0.80 and 0.90 = 85.0 % ≥ B 86.0 %? no
    assert row.outcome.verdict == FAILS and "A 85.0% vs B 86.0%" in row.outcome.measured
    assert "n=2 seeds [0, 1]" in row.ours


def test_keeps(edited_runs: list[Path], tmp_path: Path) -> None:
    keeps = {"kind": "keeps", "method": "A"}
    path = claims_file(
        tmp_path / "c.yml",
        ("all", ["s1"], {**keeps, "targets": [0.25, 0.5]}),
        ("any", ["s1"], {**keeps, "targets": [0.25, 0.5], "require": "any"}),
        ("at-050", ["s1"], {**keeps, "targets": [0.5, 0.7]}),
        ("backbone", ["s1"], {**keeps, "targets": [0.5], "reference": "backbone", "tolerance": 4}),
        ("no-point", ["s1"], {"kind": "keeps", "method": "Slow", "targets": [0.25, 0.5], "tolerance": 10}),
        ("no-target", ["s1"], {**keeps, "targets": [0.7]}),
    )
    rows = verdicts(path, *edited_runs)
    assert verdict(rows, "all") == FAILS and "worst -6.0 pts at φ=0.25" in rows["all"][0].outcome.short
    assert verdict(rows, "any") == HOLDS
    assert verdict(rows, "at-050") == HOLDS  # 85 % vs the hull end's 86 %; 0.7 is no target of the suite
    assert verdict(rows, "backbone") == FAILS  # 85 % vs the plain backbone's 90 %
    assert verdict(rows, "no-point") == FAILS and "no calibrated point" in rows["no-point"][0].outcome.reason
    assert verdict(rows, "no-target") == UNMEASURED


def test_saves(edited_runs: list[Path], real: dict[str, Any], tmp_path: Path) -> None:
    saves = {"kind": "saves", "method": "A"}
    derive(real, tmp_path / "dec", "s3", "D", {0.5: 0.6, 1: 0.6}, backbone=None)
    path = claims_file(
        tmp_path / "c.yml",
        ("target", ["s1"], {**saves, "max_cost": 0.5, "max_drop": 6}),  # 85 % vs no-exit 90 %
        ("target-tight", ["s1"], {**saves, "max_cost": 0.5, "max_drop": 4}),
        ("between", ["s1"], {**saves, "max_cost": 0.75, "max_drop": 3}),  # hull mixture: 87.5 % at 0.75
        ("between-tight", ["s1"], {**saves, "max_cost": 0.75, "max_drop": 2}),
        ("too-cheap", ["s1"], {**saves, "max_cost": 0.1, "max_drop": 50}),
        ("no-backbone", ["s3"], {"kind": "saves", "method": "D", "max_cost": 0.5, "max_drop": 1,
                                 "reference": "backbone"}),
    )
    rows = verdicts(path, *edited_runs, tmp_path / "dec")
    assert verdict(rows, "target") == HOLDS
    assert "cheapest hull vertex within 6 pts of the reference: seed 0: cost 0.600 (85.0%)" in "\n".join(
        rows["target"][0].outcome.table)
    assert verdict(rows, "target-tight") == FAILS and "drop 5.0 pts > 4" in rows["target-tight"][0].outcome.reason
    assert verdict(rows, "between") == HOLDS
    assert "87.5% at test cost 0.750 (hull mixture, expected value)" in rows["between"][0].outcome.measured
    assert verdict(rows, "between-tight") == FAILS
    assert verdict(rows, "too-cheap") == FAILS
    assert verdict(rows, "no-backbone") == UNMEASURED


def test_failed_cells_and_later_run_dirs(edited_runs: list[Path], real: dict[str, Any], tmp_path: Path) -> None:
    """Failed-cell records are skipped (a method whose cells all failed is not measured), and a later run
    directory's result replaces an earlier one's of the same cell."""
    failed = {"status": "failed", "cell_id": "s1-F-s0", "config_hash": "x", "dataset": real["dataset"],
              "backbone": real["backbone"], "method": "F", "budget": real["budget"], "seed": 0, "suite": "s1",
              "error": {"type": "RuntimeError", "message": "boom"}}
    save_cell(edited_runs[0], failed["cell_id"], failed)
    newer = tmp_path / "newer"
    derive(real, newer, "s1", "A", {0.25: 0.60, 0.5: 0.85, 1: 0.86})
    path = claims_file(
        tmp_path / "c.yml",
        ("failed", ["s1"], {"kind": "keeps", "method": "F", "targets": [0.25]}),
        ("replaced", ["s1"], {**BEATS, "targets": [0.25]}),
    )
    rows = verdicts(path, *edited_runs, newer)
    assert verdict(rows, "failed") == UNMEASURED and "failed" in rows["failed"][0].outcome.reason
    assert verdict(rows, "replaced") == FAILS  # A's 60 % from the later directory, not 80 %
    runs = load_runs([*edited_runs, newer])
    assert runs.replaced == 1 and runs.read[0][2] == 1  # one failed cell read, not used


def test_one_row_per_setting(edited_runs: list[Path], tmp_path: Path) -> None:
    path = claims_file(tmp_path / "c.yml", ("both", ["s1", "s2"], {**BEATS, "targets": [0.25]}))
    rows = verdicts(path, *edited_runs)["both"]
    assert [r.outcome.verdict for r in rows] == [HOLDS, FAILS]
    assert rows[0].ours.startswith("suite s1:") and rows[1].ours.startswith("suite s2:")


# ---------------------------------------------------------------------------------------- bad input


GOOD = {"id": "c1", "title": "t", "paper": PAPER, "suites": ["s1"],
        "check": {"kind": "beats", "method": "A", "others": ["B"], "targets": [0.25]}}


def edited(**changes: Any) -> dict[str, Any]:
    claim = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = claim
        for part in parents:
            node = node[part]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return {"claims": [claim]}


BAD = [
    (edited(check__margin="lots"), "claims[0].check.margin", "number"),
    (edited(check__kind="wins"), "claims[0].check.kind", "unknown check kind 'wins'"),
    (edited(check__kind=KeyError), "claims[0].check.kind", "required key is missing"),
    (edited(check__others=["A"]), "claims[0].check", "both the method and one of the others"),
    (edited(check__targets=[0.25, -1]), "claims[0].check.targets[1]", "greater than 0"),
    (edited(check__target=[0.25]), "claims[0].check.target", "unknown key"),
    (edited(paper__budget=KeyError), "claims[0].paper.budget", "required key is missing"),
    (edited(id="bad id"), "claims[0].id", "letters, digits"),
    (edited(suites=[]), "claims[0].suites", "at least 1"),
    ({"claims": [GOOD, GOOD]}, "claims", "claim id 'c1' appears twice"),
    ({"claim": [GOOD]}, "claims", "required key is missing"),
    (edited(check__max_cost=1), "claims[0].check.max_cost", "unknown key"),
    ("- just a list\n", "(top level)", "expected a mapping"),
    ("claims: []\nclaims: []\n", "claims", "duplicate key"),
    ("claims: [\n", "line", "not valid YAML"),
]


@pytest.mark.parametrize(("payload", "key", "expected"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_claims_file_is_one_line_exit_2(payload: Any, key: str, expected: str, edited_runs: list[Path],
                                           tmp_path: Path, capsys) -> None:
    path = tmp_path / "claims.yml"
    path.write_text(payload if isinstance(payload, str) else yaml.safe_dump(payload, allow_unicode=True))
    out = tmp_path / "claims.md"
    code = main(["claims", str(edited_runs[0]), "--claims", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"eebench: error: {path}: {key}") and expected in lines[0], lines[0]
    assert not out.exists()


def test_missing_files_and_run_dirs_are_one_line_exit_2(edited_runs: list[Path], tmp_path: Path, capsys) -> None:
    run, out = str(edited_runs[0]), str(tmp_path / "o.md")
    code = main(["claims", run, "--claims", str(tmp_path / "nope.yml"), "--out", out])
    assert code == 2 and "nope.yml: --claims: no such claims file" in capsys.readouterr().err
    code = main(["claims", str(tmp_path), "--claims", str(SHIPPED), "--out", out])
    assert code == 2 and f"{tmp_path}: RUN_DIR: no cells/ folder" in capsys.readouterr().err


def test_claims_command_imports_no_torch(edited_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "claims.md"
    argv = ["claims", str(edited_runs[0]), "--claims", str(SHIPPED), "--out", str(out)]
    code = (f"import sys, json\nfrom eebench.cli import main\nassert main({argv!r}) == 0\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'pandas'})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert out.read_text().startswith("# Paper claims checked against eebench's results")
