"""Issue 16, the run's side: one bad cell does not sink the suite, broken plugins that exit are
skipped, writes are checked before the work and survive a full disk, one run per run directory,
and the caches heal themselves."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_plugins import fake_distribution

from eebench.api import ExitCosts, ExitState, ExitStrategy, MethodReport, StagedBackbone, StepOutput
from eebench.cli import main
from eebench.datasets import TensorImageDataset
from eebench.plugins import default_registry, load_registry
from eebench.trace import ExitOutputError, compute_traces

PACKAGE = "eebench-test-hardening"
# a tiny cell: 50 training images, 50 test images, a quarter-width ResNet-20 trained for one epoch
TINY = {
    "name": "hardening",
    "datasets": [{"name": "fashion-mnist", "per_class": 5, "test_subset": 50}],
    "backbones": [{"name": "resnet20", "params": {"width": 0.25}, "recipe": {"epochs": 1, "batch_size": 50}}],
    "methods": [{"name": "e2cm"}],
    "budgets": [{"name": "epochs", "params": {"epochs": 1}}],
    "targets": [0.5],
}


def suite_with(tmp_path: Path, *methods: str, **changes) -> str:
    payload = {**TINY, "methods": [{"name": m} for m in methods] or TINY["methods"], **changes}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(payload, allow_unicode=True))
    return str(path)


def run(path: str, tmp_path: Path, capsys, *extra: str) -> tuple[int, str, str]:
    """Exit code, the progress log (stdout and stderr, rich's wrapping undone) and stderr."""
    code = main(["run", path, "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "boards"), *extra])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split()), captured.err


def cell_files(tmp_path: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in sorted((tmp_path / "run" / "cells").glob("*.json"))}


def e2cm() -> type[ExitStrategy]:
    return default_registry().factories["exit_strategies"]["e2cm"]


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Register a test exit strategy under ``name`` as if package ``eebench-test-hardening`` had."""
    registry = default_registry()

    def add(name: str, factory) -> None:
        monkeypatch.setitem(registry.factories["exit_strategies"], name, factory)
        monkeypatch.setitem(registry.owners["exit_strategies"], name, PACKAGE)
    return add


# ---------------------------------------------------------------- one bad cell does not sink the suite

FLAKY = {"fail": True}


def _raising(exc: BaseException, when: dict | None = None):
    class Raising(e2cm()):
        def fit(self, train, budget):
            if when is None or when["fail"]:
                raise exc
            super().fit(train, budget)
    return Raising


def test_a_cell_that_raises_is_recorded_the_others_run_and_the_exit_code_is_3(tmp_path, capsys, register) -> None:
    FLAKY["fail"] = True
    register("third-party-fit", _raising(RuntimeError("the solver diverged\nwith a second line"), FLAKY))
    register("calls-exit", _raising(SystemExit(5)))
    path = suite_with(tmp_path, "third-party-fit", "e2cm", "calls-exit")
    code, out, err = run(path, tmp_path, capsys)
    assert code == 3, err
    cells = cell_files(tmp_path)
    assert "status" not in cells["e2cm"] and cells["e2cm"]["accuracy_at"]  # the cell after the failure ran
    failed = cells["third-party-fit"]
    assert failed["status"] == "failed"
    error = failed["error"]
    assert (error["type"], error["message"], error["phase"]) == ("RuntimeError", "the solver diverged with a second "
                                                                 "line", "fit")
    assert error["plugin"] == {"kind": "exit strategy", "name": "third-party-fit", "package": PACKAGE,
                               "version": PACKAGE}
    assert "Traceback" in error["traceback"] and "the solver diverged" in error["traceback"]
    assert cells["calls-exit"]["error"]["type"] == "SystemExit"
    assert "FAILED" in out and "third-party-fit" in out and "RuntimeError: the solver diverged" in out
    summary = [line for line in err.splitlines() if line.startswith("eebench: error")]
    assert len(summary) == 1 and "2 cell(s) failed" in summary[0] and "Traceback" not in err
    board = (tmp_path / "boards" / "hardening.md").read_text().splitlines()
    row = next(line for line in board if line.startswith("| third-party-fit |"))
    assert "failed" in row and "RuntimeError: the solver diverged" in row and PACKAGE in row
    assert any(line.startswith(("| e2cm |", "| e2cm ⚠ |")) and "%" in line for line in board)
    assert "## Failed cells" in board

    # a failed cell is not finished: the next run computes it again (and only it)
    FLAKY["fail"] = False
    code, out, err = run(suite_with(tmp_path, "third-party-fit", "e2cm"), tmp_path, capsys)
    assert code == 0, err
    assert out.count(": running") == 1 and "third-party-fit" in out.split(": running")[0].split("]")[-1]
    assert out.count("already done, skipped") == 1
    cells = cell_files(tmp_path)
    assert "status" not in cells["third-party-fit"] and cells["third-party-fit"]["accuracy_at"]
    board = (tmp_path / "boards" / "hardening.md").read_text()
    assert "failed" not in board.split("## Notes")[0]


def test_keyboard_interrupt_in_a_cell_still_stops_the_run(tmp_path, capsys, register) -> None:
    register("interrupted", _raising(KeyboardInterrupt()))
    code, _, err = run(suite_with(tmp_path, "e2cm", "interrupted"), tmp_path, capsys)
    assert code == 2 and "interrupted" in err and "finished cells are kept" in err
    cells = cell_files(tmp_path)
    assert list(cells) == ["e2cm"]  # finished work kept, nothing recorded for the interrupted cell


def test_a_bad_parameter_value_of_the_suite_is_still_one_line_and_code_2(tmp_path, capsys, register) -> None:
    class Picky(e2cm()):
        def __init__(self, backbone, context, tolerance: float = 1.0) -> None:
            if tolerance < 0:
                raise ValueError(f"tolerance must be >= 0, got {tolerance}")
            super().__init__(backbone, context)

    register("picky", Picky)
    payload = {**TINY, "methods": [{"name": "picky", "params": {"tolerance": -1}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(payload))
    code, _, err = run(str(path), tmp_path, capsys)
    assert code == 2 and "methods[0].params" in err and "tolerance must be >= 0" in err
    assert not list((tmp_path / "run" / "cells").glob("*.json"))


class _Fixed(ExitStrategy):
    """Hands the harness fixed outputs per exit (``preds[j]``, ``scores[j]``) on two identity stages."""

    def __init__(self, preds: torch.Tensor, scores: torch.Tensor, variants: int = 1) -> None:
        backbone = StagedBackbone([torch.nn.Identity(), torch.nn.Identity()], torch.nn.Identity())
        super().__init__(backbone, SimpleNamespace(num_classes=10))
        self.preds, self.scores, self.variants = preds, scores, variants

    def fit(self, train, budget) -> None:
        pass

    def exit_taps(self) -> list[int]:
        return [0]

    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        rows = features.shape[0]
        return StepOutput(self.preds[j][..., :rows], self.scores[j][..., :rows])

    def exit_costs(self) -> ExitCosts:
        return ExitCosts(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 2.0)

    def report(self) -> MethodReport:
        variants = [str(i) for i in range(self.variants)] if self.variants > 1 else [""]
        return MethodReport(exit_names=["early", "final"], variants=variants)

    def modules(self):
        return []


GOOD_PREDS, GOOD_SCORES = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8)


@pytest.mark.parametrize(("preds", "scores", "variants", "expected"), [
    (GOOD_PREDS[..., None], GOOD_SCORES[..., None], 1, "exit_step(0) outputs are [8, 1] for 8 rows"),
    (GOOD_PREDS, torch.zeros(2, 3), 1, "exit_step(0) preds are [8] but scores [3]; expected the same shape"),
    (GOOD_PREDS, GOOD_SCORES, 2, "P == len(MethodReport.variants) == 2"),
    (GOOD_PREDS.float(), GOOD_SCORES, 1, "expected integer class ids"),
    (GOOD_PREDS, torch.tensor([[0.0, float("nan")] * 4, [0.0] * 8]), 1, "exit_step(0) 4 NaN scores"),
    (GOOD_PREDS + torch.tensor([[0] * 7 + [10], [0] * 8]), GOOD_SCORES, 1, "predictions outside [0, 10) (e.g. 10)"),
    (GOOD_PREDS - 1, GOOD_SCORES, 1, "outside [0, 10)"),
])
def test_bad_outputs_are_refused_at_the_boundary_naming_the_plugin(preds, scores, variants, expected) -> None:
    dataset = TensorImageDataset(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    strategy = _Fixed(preds, scores, variants)
    with pytest.raises(ExitOutputError) as caught:
        compute_traces(strategy, dataset, batch_size=8, device="cpu", description="test trace",
                       plugin="exit strategy 'fixed' (some-package)")
    message = str(caught.value)
    assert message.startswith("exit strategy 'fixed' (some-package): test trace, batch 0: "), message
    assert "exit_step" in message and expected in message, message
    good = _Fixed(GOOD_PREDS, GOOD_SCORES)  # the same pass with valid outputs goes through
    assert compute_traces(good, dataset, batch_size=8, device="cpu")[0].num_exits == 2


def test_nan_scores_fail_the_cell_not_the_run(tmp_path, capsys, register) -> None:
    class NaNScores(e2cm()):
        def exit_step(self, j, features, state):
            out = super().exit_step(j, features, state)
            return StepOutput(out.preds, torch.full_like(out.scores, float("nan")), out.detail)

    register("nan-scores", NaNScores)
    code, _, err = run(suite_with(tmp_path, "nan-scores", "e2cm"), tmp_path, capsys)
    assert code == 3, err
    cells = cell_files(tmp_path)
    error = cells["nan-scores"]["error"]
    assert error["type"] == "ExitOutputError" and "NaN scores" in error["message"]
    assert f"exit strategy 'nan-scores' ({PACKAGE})" in error["message"]
    assert error["phase"].startswith("trace") and "status" not in cells["e2cm"]


def test_a_run_where_every_cell_failed_still_renders_its_leaderboard(tmp_path, capsys, register) -> None:
    register("always-fails", _raising(ValueError("no")))
    code, _, _ = run(suite_with(tmp_path, "always-fails"), tmp_path, capsys)
    assert code == 3
    board = (tmp_path / "boards" / "hardening.md").read_text()
    assert "| always-fails | failed |" in board and "ValueError: no" in board


# ---------------------------------------------------------------- plugins that exit while loading


def test_a_plugin_that_exits_while_importing_or_registering_is_skipped(site: Path, capsys) -> None:
    fake_distribution(site, "eebench-exits-on-import", "eebench_test_exits_on_import",
                      "import sys\nsys.exit('bye')\n")
    fake_distribution(site, "eebench-exits-on-register", "eebench_test_exits_on_register", """
        import sys
        from eebench import hookimpl

        @hookimpl
        def register_budgets(register):
            register("exiting-budget", object)
            raise SystemExit()
    """)
    registry = load_registry()
    failures = "\n".join(registry.failures)
    assert "eebench_test_exits_on_import" in failures and "sys.exit('bye')" in failures
    assert "eebench_test_exits_on_register" in failures and "failed to register: SystemExit" in failures
    assert "exiting-budget" not in registry.factories["budgets"]
    assert "e2cm" in registry.factories["exit_strategies"]  # everything else still loads
    err = capsys.readouterr().err
    assert err.count("eebench_test_exits_on_import") == 1 and err.count("eebench_test_exits_on_register") == 1


# ---------------------------------------------------------------- writes checked before the work, and after


def test_every_output_folder_is_checked_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    from eebench.runner import Runner

    def no_work(*args, **kwargs):
        raise AssertionError("a cell started before the output folders were checked")

    monkeypatch.setattr(Runner, "run_cell", no_work)
    path = suite_with(tmp_path, "e2cm")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    # the cells folder
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cells").write_text("a file where the cells folder goes")
    code, _, err = run(path, tmp_path, capsys)
    assert code == 2 and str(tmp_path / "run" / "cells") in err and "--out" in err
    (tmp_path / "run" / "cells").unlink()

    # the figures folder under the leaderboard folder
    shutil.rmtree(tmp_path / "boards")  # the first case made it
    (tmp_path / "boards").mkdir()
    (tmp_path / "boards" / "hardening").write_text("a file where the figures go")
    code, _, err = run(path, tmp_path, capsys)
    assert code == 2 and str(tmp_path / "boards" / "hardening") in err and "--leaderboards" in err
    (tmp_path / "boards" / "hardening").unlink()

    # the backbone cache, when a base network will have to be trained
    monkeypatch.setenv("EEBENCH_CACHE", str(blocker / "cache"))
    code, _, err = run(path, tmp_path, capsys)
    assert code == 2 and "EEBENCH_CACHE" in err and str(blocker / "cache") in err


def test_a_result_that_cannot_be_written_is_kept_and_reported(tmp_path, capsys, monkeypatch) -> None:
    import eebench.results as results

    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith(".json") and "cells" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", disk_full)
    code, out, err = run(suite_with(tmp_path, "e2cm"), tmp_path, capsys)
    assert code == 4, err
    warning = next(line for line in err.splitlines() if "warning" in line)
    assert "cannot write the result of cell" in warning and "No space left on device" in warning
    assert str(tmp_path / "run" / "cells") in warning and "kept in memory" in warning
    assert not list((tmp_path / "run" / "cells").iterdir())  # no temporary file left behind
    board = (tmp_path / "boards" / "hardening.md").read_text()  # the result, in memory (below)
    assert any(line.startswith(("| e2cm |", "| e2cm ⚠ |")) and "%" in line for line in board.splitlines())


def test_a_name_the_filesystem_refuses_falls_back_to_a_hash_name(tmp_path, capsys, monkeypatch) -> None:
    import eebench.results as results

    monkeypatch.setattr(results, "cell_path", lambda run_dir, cell_id: run_dir / "cells" / f"{'x' * 300}.json")
    path = suite_with(tmp_path, "e2cm")
    code, _, err = run(path, tmp_path, capsys)
    assert code == 0, err
    (written,) = (tmp_path / "run" / "cells").glob("*.json")
    assert written.name.startswith("cell-") and len(written.name) < 40
    code, out, _ = run(path, tmp_path, capsys)  # found again: not recomputed
    assert code == 0 and "already done, skipped" in out


def test_temporary_files_are_unique_per_writer_and_removed_on_failure(tmp_path, monkeypatch) -> None:
    import eebench.results as results

    seen = []

    def failing_replace(src, dst):
        seen.append(Path(src).name)
        raise OSError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(results.os, "replace", failing_replace)
    for _ in range(2):
        with pytest.raises(OSError):
            results.write_atomic(tmp_path / "cell.json", {"a": 1})
    assert len(set(seen)) == 2 and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- one run per run directory


def test_a_second_run_into_the_same_directory_refuses(tmp_path, capsys, monkeypatch) -> None:
    from eebench.runner import Runner

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        monkeypatch.setattr(Runner, "run_cell", lambda *a: pytest.fail("the second run computed a cell"))
        code, _, err = run(suite_with(tmp_path, "e2cm"), tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("eebench: error")]
    assert code == 2 and len(lines) == 1, err
    assert str(run_dir) in lines[0] and "pid 4242" in lines[0] and "another eebench run" in lines[0]


# ---------------------------------------------------------------- the caches heal themselves


def test_a_corrupt_cached_backbone_is_moved_aside_and_retrained(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("EEBENCH_CACHE", str(tmp_path / "cache"))
    path = suite_with(tmp_path, "e2cm")
    code, _, err = run(path, tmp_path, capsys)
    assert code == 0, err
    (weights,) = (tmp_path / "cache" / "backbones").glob("*.pt")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    for cell in (tmp_path / "run" / "cells").glob("*.json"):
        cell.unlink()
    code, _, err = run(path, tmp_path, capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "unreadable" in line]
    assert len(warning) == 1 and str(weights) in warning[0] and "retraining" in warning[0]
    (aside,) = (tmp_path / "cache" / "backbones").glob("*.pt.corrupt-*")
    assert aside.stat().st_size == 1000 and str(aside) in warning[0]
    state = torch.load(weights, weights_only=True)  # the retrained entry is whole again
    assert isinstance(state, dict) and state


@pytest.mark.parametrize("damage", ["[1, 2]", '{"config_hash": "HASH", "provenance": {"device": "cpu"}}', "{",
                                    '"text"'])
def test_a_damaged_cell_file_is_recomputed(tmp_path, capsys, damage) -> None:
    path = suite_with(tmp_path, "e2cm")
    code, _, err = run(path, tmp_path, capsys)
    assert code == 0, err
    (cell,) = (tmp_path / "run" / "cells").glob("*.json")
    config_hash = json.loads(cell.read_text())["config_hash"]
    cell.write_text(damage.replace("HASH", config_hash))
    code, out, err = run(path, tmp_path, capsys)
    assert code == 0, err
    assert "already done" not in out and "done in" in out
    assert json.loads(cell.read_text())["accuracy_at"]
