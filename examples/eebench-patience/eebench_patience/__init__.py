"""eebench-patience: an example third-party eebench plugin.

Installing this package is all it takes: its ``eebench`` entry point names this module,
eebench loads it, and the hook below registers the exit strategy ``patience``.
"""

from __future__ import annotations

from eebench import hookimpl
from eebench_patience.strategy import PatienceExit, patience_counters

__version__ = "0.1.0"
__all__ = ["PatienceExit", "__version__", "patience_counters", "register_exit_strategies"]


@hookimpl
def register_exit_strategies(register) -> None:
    register("patience", PatienceExit)
