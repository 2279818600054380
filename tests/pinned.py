"""The numbers tests/test_pinned_results.py pins: a tiny suite's results, minus anything timed.

Regenerate after a *deliberate* change of results (say which in the commit):
    python tests/pinned.py RUN_DIR        # RUN_DIR from: eebench run tests/data/pinned_suite.yaml --out RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PINNED_FILE = Path(__file__).parent / "data" / "pinned_results.json"
PINNED_KEYS = ("exits", "variants", "curve", "accuracy_at", "no_exit", "operating_points", "spend")
TIMED = {"seconds"}  # wall-clock fields vary from run to run


def untimed(value: Any) -> Any:
    """``value`` without its wall-clock fields (at any depth)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def pinned_numbers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per method label: the pinned keys of its cell result."""
    out = {}
    for path in sorted((run_dir / "cells").glob("*.json")):
        result = json.loads(path.read_text())
        out[result["method"]] = untimed({key: result.get(key) for key in PINNED_KEYS})
    return out


if __name__ == "__main__":
    PINNED_FILE.write_text(json.dumps(pinned_numbers(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED_FILE}")
