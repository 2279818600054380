"""eebench's conformance kit on this plugin: the one line a method author's test suite needs.

With the package installed, ``check_exit_strategy("patience")`` checks the registered name
(entry point included); the factory form below needs only the package importable.
"""

from eebench_patience import PatienceExit

from eebench.testing import check_exit_strategy


def test_patience_passes_the_eebench_conformance_kit() -> None:
    check_exit_strategy(PatienceExit)
