"""Bad input ends in one line naming file, key and expectation, exit code 2; runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eebench.cli import main

TINY = {
    "name": "tiny",
    "datasets": [{"name": "fashion-mnist", "per_class": 10, "test_subset": 100}],
    "backbones": [{"name": "resnet20", "recipe": {"epochs": 1, "batch_size": 50}}],
    "methods": [{"name": "e2cm"}],
    "budgets": [{"name": "epochs", "params": {"epochs": 1}}],
    "targets": [0.5],
}


def write_suite(tmp_path: Path, payload: dict | str, name: str = "suite.yaml") -> str:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else yaml.safe_dump(payload, allow_unicode=True))
    return str(path)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("eebench: error")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def edited(**changes) -> dict:
    suite = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        target = suite
        *path, last = dotted.split("__")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return suite


@pytest.mark.parametrize(
    ("payload", "key", "expectation"),
    [
        ("name: [unclosed\n", "line", "not valid YAML"),
        ("- just\n- a list\n", "(top level)", "expected a mapping"),
        (edited(datasets="fashion-mnist"), "datasets", "valid list"),
        (edited(targets=[0.5, -1]), "targets", "> 0"),
        (edited(colour="blue"), "colour", "unknown key"),
        (edited(backbones__0__recipe__lr="fast"), "backbones[0].recipe.lr", "valid number"),
        (edited(methods__0__name="no-such-method"), "methods[0].name", "unknown exit strategy 'no-such-method'"),
        (edited(budgets__0__name="weeks"), "budgets[0].name", "unknown budget 'weeks'"),
        (edited(backbones__0__name="resnet7"), "backbones[0].name", "unknown backbone 'resnet7'"),
        (edited(methods__0__params={"pool_size": 2}), "methods[0].params", "expected parameters among"),
        (edited(budgets__0__params={"epochs": 0}), "budgets[0].params", "epochs must be > 0"),
    ],
)
def test_malformed_suites_get_one_line_and_code_2(tmp_path, capsys, payload, key, expectation) -> None:
    path = write_suite(tmp_path, payload)
    for command in (["validate", path], ["run", path, "--out", str(tmp_path / "run")]):
        code, err = run_cli(command, capsys)
        line = one_line_error(err)
        assert code == 2
        assert path in line and key in line and expectation in line, line


def test_missing_suite_file(tmp_path, capsys) -> None:
    code, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in one_line_error(err)


def test_missing_dataset_names_where_it_looked(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    suite = edited(datasets=[{"name": "mnist", "params": {"root": str(empty)}}])
    path = write_suite(tmp_path, suite)
    code, err = run_cli(["run", path, "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "b")], capsys)
    line = one_line_error(err)
    assert code == 2 and path in line and "datasets[0]" in line and str(empty) in line


def test_unwritable_output_directory(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = write_suite(tmp_path, TINY)
    code, err = run_cli(["run", path, "--out", str(blocker / "run")], capsys)
    line = one_line_error(err)
    assert code == 2 and str(blocker / "run") in line and "--out" in line and "writable directory" in line


def test_nan_loss_is_reported(tmp_path, capsys) -> None:
    suite = edited(backbones__0__recipe={"epochs": 1, "batch_size": 50, "lr": 1e38})
    path = write_suite(tmp_path, suite)
    code, err = run_cli(["run", path, "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "b")], capsys)
    line = one_line_error(err)
    assert code == 2 and "backbones[0].recipe" in line and "finite loss" in line


def test_debug_shows_the_traceback(tmp_path) -> None:
    path = write_suite(tmp_path, edited(methods__0__name="no-such-method"))
    from eebench.errors import EebenchError

    with pytest.raises(EebenchError):
        main(["--debug", "validate", path])


def test_interrupted_run_resumes_without_redoing_finished_cells(tmp_path) -> None:
    suite = edited(seeds=[0, 1])
    path = write_suite(tmp_path, suite)
    out, boards = tmp_path / "run", tmp_path / "boards"
    env = {**os.environ, "EEBENCH_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "eebench.cli", "run", path, "--out", str(out), "--leaderboards", str(boards)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cells = out / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cells.glob("[!.]*.json")):  # not a result still being written
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    finished = sorted(cells.glob("*.json"))
    assert process.returncode == 2, stderr
    assert len(finished) == 1, "the second cell was still running when interrupted"
    assert "interrupted" in stderr and "rerun" in stderr and "Traceback" not in stderr
    first_written = finished[0].stat().st_mtime_ns

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done, skipped" in rerun.stdout + rerun.stderr
    assert finished[0].stat().st_mtime_ns == first_written
    assert len(list(cells.glob("*.json"))) == 2
    assert (boards / "tiny.md").is_file()


@pytest.mark.parametrize(
    ("changes", "key", "expectation"),
    [
        ({"methods": [{"name": "sdn", "params": {"lr": 0}}]}, "methods[0].params", "lr must be > 0"),
        ({"backbones": [{"name": "timm:no_such_network", "recipe": {"epochs": 1}}]}, "backbones[0]",
         "no_such_network"),
    ],
)
def test_bad_parameter_values_found_at_run_time_are_one_line_and_code_2(tmp_path, capsys, changes, key,
                                                                         expectation) -> None:
    path = write_suite(tmp_path, {**TINY, **changes})
    code, err = run_cli(["run", path, "--out", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "b")], capsys)
    line = one_line_error(err)
    assert code == 2 and path in line and key in line and expectation in line, line


def test_debug_after_the_subcommand_also_shows_the_traceback(tmp_path) -> None:
    path = write_suite(tmp_path, edited(methods__0__name="no-such-method"))
    from eebench.errors import EebenchError

    for argv in (["validate", path, "--debug"], ["--debug", "run", path, "--out", str(tmp_path / "run")]):
        with pytest.raises(EebenchError):
            main(argv)


def test_leaderboard_of_an_empty_run_directory(tmp_path, capsys) -> None:
    (tmp_path / "run" / "cells").mkdir(parents=True)
    code, err = run_cli(["leaderboard", str(tmp_path / "run"), "--leaderboards", str(tmp_path / "b")], capsys)
    line = one_line_error(err)
    assert code == 2 and "cells" in line and "expected JSON files" in line


def test_unknown_device_is_one_line_and_code_2(tmp_path, capsys) -> None:
    path = write_suite(tmp_path, TINY)
    code, err = run_cli(["run", path, "--out", str(tmp_path / "run"), "--device", "tpu"], capsys)
    assert code == 2 and "--device" in one_line_error(err)


SUITES = Path(__file__).resolve().parents[1] / "suites"


@pytest.mark.parametrize("suite", sorted(str(p.relative_to(SUITES)) for p in SUITES.rglob("*.yaml")))  # + paper/
def test_every_shipped_suite_validates(suite, capsys) -> None:
    path = SUITES / suite
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
