"""Every cell result records where it came from; the leaderboard footer summarises it and says when cells differ."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from eebench.leaderboard import render

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout


def git_state_of(code_root: Path) -> dict | None:
    """``provenance.git_state()`` in a fresh interpreter importing eebench from ``code_root``."""
    probe = "import json; from eebench.provenance import git_state; print(json.dumps(git_state()))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=code_root, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(code_root)}, timeout=60)
    return json.loads(done.stdout)


def test_a_result_records_code_libraries_and_machine(smoke_run: Path) -> None:
    (path,) = sorted((smoke_run / "run" / "cells").glob("*.json"))
    provenance = json.loads(path.read_text())["provenance"]
    eebench_dir = Path(__import__("eebench").__file__).resolve().parent
    head = git("rev-parse", "HEAD", cwd=eebench_dir).strip()
    assert provenance["git"]["commit"] == head and isinstance(provenance["git"]["dirty"], bool)
    assert provenance["plugin_packages"]["eebench"] == metadata.version("eebench")
    libraries = provenance["libraries"]
    assert set(libraries) == {"torch", "torchvision", "timm", "numpy", "pandas", "python"}
    assert libraries["torch"] == metadata.version("torch") and libraries["numpy"] == metadata.version("numpy")
    assert provenance["cpu"]["cores"] == os.cpu_count() and provenance["cpu"]["model"]
    assert provenance["gpu"] is None  # a CPU run
    board = (smoke_run / "boards" / "smoke.md").read_text()
    footer = board.rstrip().splitlines()[-2:]
    assert footer[0].startswith("Provenance of the cells: eebench: ") and f"git {head[:10]}" in footer[0]
    assert f"torch {libraries['torch']}" in footer[0] and footer[1] == "All 1 cells share this provenance."


def copy_code(root: Path) -> Path:
    """eebench and its built-in plugins as a fresh checkout of their own (or as plain folders)."""
    shutil.copytree(ROOT / "eebench", root / "eebench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", root / "eebench_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_no_git_checkout_records_null(tmp_path: Path) -> None:
    assert git_state_of(copy_code(tmp_path)) is None


def test_dirty_means_uncommitted_changes_to_the_code_only(tmp_path: Path) -> None:
    root = copy_code(tmp_path)
    (root / "leaderboards").mkdir()
    (root / "leaderboards" / "board.md").write_text("old\n")
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "code", cwd=root)
    head = git("rev-parse", "HEAD", cwd=root).strip()
    assert git_state_of(root) == {"commit": head, "dirty": False}
    (root / "leaderboards" / "board.md").write_text("regenerated\n")  # a run's own output: still clean
    assert git_state_of(root) == {"commit": head, "dirty": False}
    with (root / "eebench_plugins" / "e2cm.py").open("a") as handle:
        handle.write("\n# edited\n")
    assert git_state_of(root) == {"commit": head, "dirty": True}


def test_the_footer_says_when_cells_differ(two_seed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_seed_run / "run", run)
    path = sorted((run / "cells").glob("*.json"))[0]
    result = json.loads(path.read_text())
    result["provenance"]["git"] = {"commit": "0123456789abcdef", "dirty": True}
    result["provenance"]["libraries"]["torch"] = "9.9.9"
    path.write_text(json.dumps(result))
    board = render(run, tmp_path / "boards", "two-seeds", [0.5]).read_text()
    first, second = board.rstrip().splitlines()[-2:]
    assert "git 0123456789 with uncommitted changes (1 cell)" in first and "(3 cells)" in first
    assert second == "The cells differ in checkout, libraries: compare their numbers with care."
