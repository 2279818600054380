"""Whether a run directory's leaderboard is still what ``eebench run`` would draw, so a resumed run with
nothing to do redraws no figure (and imports no matplotlib).

``RUN_DIR/.leaderboard.json`` keeps, per leaderboard directory, a fingerprint of what the board was drawn
from (the render's arguments, the cell files' sizes and times) and of the board's own files as written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eebench import __version__
from eebench.leaderboard import slug

BOARD_STATE = ".leaderboard.json"  # in the run directory: the state of each leaderboard it last drew


def _board_state(run_dir: Path, board_dir: Path, suite_name: str, inputs: list, path: Path) -> str:
    """A fingerprint of what ``eebench run`` draws a leaderboard from (the render's arguments and the cell
    files) and of the board's files as written (the markdown and the suite's figures)."""
    files = [path, *sorted((run_dir / "cells").glob("*.json")), *sorted((board_dir / slug(suite_name)).glob("*"))]
    stats = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            stats.append([str(file), None])
            continue
        stats.append([str(file), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([__version__, str(board_dir.resolve()), inputs, stats], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _board_states(run_dir: Path) -> dict:
    try:
        states = json.loads((run_dir / BOARD_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return states if isinstance(states, dict) else {}


def unchanged_board(run_dir: Path, board_dir: Path, suite_name: str, inputs: list) -> Path | None:
    """The leaderboard this run directory last drew into ``board_dir``, when nothing it shows has changed since
    (no cell file, no suite value, no file of the board itself): a resumed run with nothing to do redraws no
    figure (and imports no matplotlib)."""
    recorded = _board_states(run_dir).get(str(board_dir.resolve()))
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        return None
    path = Path(recorded["path"])
    if recorded.get("state") != _board_state(run_dir, board_dir, suite_name, inputs, path):
        return None
    return path


def record_board(run_dir: Path, board_dir: Path, suite_name: str, inputs: list, path: Path) -> None:
    states = _board_states(run_dir)
    states[str(board_dir.resolve())] = {"path": str(path),
                                        "state": _board_state(run_dir, board_dir, suite_name, inputs, path)}
    try:
        (run_dir / BOARD_STATE).write_text(json.dumps(states, indent=1))
    except OSError:
        pass  # only a shortcut: the next run draws the leaderboard again
