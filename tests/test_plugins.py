"""Plugin discovery through real entry points: isolation of broken plugins, duplicate names."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from eebench.cli import main
from eebench.errors import EebenchError
from eebench.plugins import load_registry


def fake_distribution(root: Path, name: str, module: str, source: str) -> None:
    """A real installed distribution on sys.path: dist-info with an entry point + its module."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[eebench]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("eebench_test_")]:
        del sys.modules[module]


def test_builtins_are_registered_through_the_entry_point_group() -> None:
    registry = load_registry()
    assert "e2cm" in registry.factories["exit_strategies"]
    assert {"epochs", "samples", "seconds"} <= set(registry.factories["budgets"])
    assert {"per-exit-bisection", "shared-threshold", "random-search"} <= set(registry.factories["calibrators"])
    assert registry.owners["exit_strategies"]["e2cm"] == "eebench"


def test_broken_plugin_is_reported_and_skipped(site: Path, capsys: pytest.CaptureFixture) -> None:
    fake_distribution(site, "eebench-broken", "eebench_test_broken", "raise ImportError('no such thing')\n")
    registry = load_registry()
    assert any("eebench_test_broken" in f and "no such thing" in f for f in registry.failures)
    assert "e2cm" in registry.factories["exit_strategies"]  # everything else still loads
    assert capsys.readouterr().err.count("eebench_test_broken") == 1


def test_duplicate_name_names_both_packages(site: Path) -> None:
    fake_distribution(site, "eebench-dupe", "eebench_test_dupe", """
        from eebench import hookimpl

        @hookimpl
        def register_exit_strategies(register):
            register("e2cm", object)
    """)
    with pytest.raises(EebenchError) as caught:
        load_registry()
    assert "'eebench'" in str(caught.value) and "'eebench-dupe'" in str(caught.value)


def test_plugins_command_prints_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 0
    payload = json.loads(capsys.readouterr().out)
    builtin = [p for p in payload["plugins"] if p["package"] == "eebench"]
    assert {"register_exit_strategies"} <= {h for p in builtin for h in p["hooks"]}
    names = {n for p in builtin for ns in p["registered"].values() for n in ns}
    assert {"e2cm", "fashion-mnist", "resnet20", "epochs", "per-exit-bisection"} <= names
    assert all(p["version"] for p in payload["plugins"])
