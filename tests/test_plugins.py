"""Plugin discovery through real entry points: isolation of broken plugins, duplicate names."""

from __future__ import annotations

import json
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


def test_plugin_whose_hook_raises_is_skipped_without_leftovers(site: Path, capsys: pytest.CaptureFixture) -> None:
    fake_distribution(site, "eebench-halfway", "eebench_test_halfway", """
        from eebench import hookimpl

        @hookimpl
        def register_budgets(register):
            register("halfway-budget", object)
            raise RuntimeError("registration blew up")
    """)
    registry = load_registry()
    assert any("eebench_test_halfway" in f and "registration blew up" in f for f in registry.failures)
    assert "halfway-budget" not in registry.factories["budgets"]  # nothing of it stays registered
    assert "eebench-halfway" not in {p.package for p in registry.plugins}
    assert "epochs" in registry.factories["budgets"]
    assert capsys.readouterr().err.count("eebench_test_halfway") == 1


def test_two_packages_may_share_an_entry_point_name(site: Path) -> None:
    """A third party naming its entry point like a built-in one ('e2cm') loads side by side with it."""
    info = site / "eebench_samename-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eebench-samename\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[eebench]\ne2cm = eebench_test_samename\n")
    (site / "eebench_test_samename.py").write_text(textwrap.dedent("""
        from eebench import hookimpl

        @hookimpl
        def register_budgets(register):
            register("samename-budget", object)
    """))
    registry = load_registry()
    assert registry.owners["budgets"]["samename-budget"] == "eebench-samename"
    assert registry.owners["exit_strategies"]["e2cm"] == "eebench"


def test_duplicate_name_through_the_cli_is_one_line_and_code_2(site: Path, capsys: pytest.CaptureFixture) -> None:
    from eebench.plugins import default_registry

    fake_distribution(site, "eebench-dupe2", "eebench_test_dupe2", """
        from eebench import hookimpl

        @hookimpl
        def register_budgets(register):
            register("epochs", object)
    """)
    default_registry.cache_clear()
    try:
        assert main(["plugins"]) == 2
    finally:
        default_registry.cache_clear()
    err = capsys.readouterr().err
    assert err.count("eebench: error") == 1 and "'eebench-dupe2'" in err and "Traceback" not in err


def test_every_built_in_keeps_its_entry_point_hooks_and_names() -> None:
    """The lazy manifests register exactly what the implementation modules used to, in the same order."""
    expected = {
        "backbones": {"backbones": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18",
                                    "resnet152", "wide_resnet101_2", "mobilenet_v3_large", "efficientnet_b0",
                                    "timm:"]},
        "branchynet": {"exit_strategies": ["branchynet"]},
        "budgets": {"budgets": ["epochs", "samples", "seconds"]},
        "bwds": {"exit_strategies": ["bwds"]},
        "calibrators": {"calibrators": ["per-exit-bisection", "shared-threshold", "random-search"]},
        "class-exclusion": {"exit_strategies": ["class-exclusion"], "calibrators": ["class-exclusion-search"]},
        "datasets": {"datasets": ["fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn", "image-folder"]},
        "dec": {"backbones": ["dec"], "exit_strategies": ["dec-e2cm"]},
        "e2cm": {"exit_strategies": ["e2cm"]},
        "e2cm+sdn": {"exit_strategies": ["e2cm+sdn"]},
        "eenet": {"exit_strategies": ["eenet"]},
        "sdn": {"exit_strategies": ["sdn"]},
    }
    registry = load_registry()
    built_in = {p.entry_point: p for p in registry.plugins if p.package == "eebench"}
    assert {name: info.registered for name, info in built_in.items()} == expected
    assert all(info.hooks == [f"register_{kind}" for kind in expected[name]] for name, info in built_in.items())
    assert not registry.failures
