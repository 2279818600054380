"""Lazy registration: plugins register ``module:attribute`` references, imported on first use.

``eebench plugins`` and ``eebench validate`` load every plugin's register hook and import no heavy
library; a resumed run with nothing to do redraws no figure. Real entry points, real subprocesses.
"""

from __future__ import annotations

import builtins
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from eebench.errors import EebenchError
from eebench.lazy import LazyFactory, declared_attribute, lazy, resolve
from eebench.params import check_params, declared_params
from eebench.plugins import default_registry, load_registry
from eebench.suite import check_plugins, load_suite

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "fvcore", "scipy", "sklearn", "matplotlib", "pandas")


def imported_after(code: str, cwd: Path = ROOT) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy top-level packages it imported."""
    report = f"import sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)})))"
    probe = f"{code}\n{report}"
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plugins_and_validate_import_no_heavy_library() -> None:
    suites = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "suites").rglob("*.yaml"))  # and suites/paper/
    code = ("from eebench.cli import main\n"
            "assert main(['plugins']) == 0\n"
            + "".join(f"assert main(['validate', {s!r}]) == 0\n" for s in suites))
    assert imported_after(code) == []


def test_help_imports_no_heavy_library() -> None:
    code = "from eebench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert imported_after(code) == []


def test_resumed_run_with_nothing_to_do_redraws_no_figure(smoke_run: Path, tmp_path: Path) -> None:
    shutil.copytree(smoke_run / "run", tmp_path / "run")
    shutil.copytree(smoke_run / "boards", tmp_path / "boards")
    argv = ["run", str(ROOT / "suites" / "smoke.yaml"), "--out", str(tmp_path / "run"),
            "--leaderboards", str(tmp_path / "boards")]
    resume = f"from eebench.cli import main\nassert main({argv!r}) == 0"
    assert "matplotlib" in imported_after(resume)  # another run directory drew this board: drawn again
    board = tmp_path / "boards" / "smoke.md"
    (figure,) = (tmp_path / "boards" / "smoke").glob("*.png")
    drawn = board.stat().st_mtime_ns, figure.stat().st_mtime_ns
    heavy = imported_after(resume)
    assert "matplotlib" not in heavy and "torchvision" not in heavy, heavy
    assert (board.stat().st_mtime_ns, figure.stat().st_mtime_ns) == drawn  # nothing rewritten
    figure.unlink()  # a board file changed: drawn again
    assert "matplotlib" in imported_after(resume) and figure.exists()


# ------------------------------------------------------------------------------------------ lazy()


@pytest.fixture
def target_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module on sys.path that records its own import."""
    name = "eebench_test_lazy_target"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import builtins

        builtins.eebench_test_lazy_imports = getattr(builtins, "eebench_test_lazy_imports", 0) + 1
        NOT_CALLABLE = 3


        class Thing:
            strict = True

            def __init__(self, size: int = 1) -> None:
                self.size = size
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(builtins, "eebench_test_lazy_imports", 0, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_lazy_factory_imports_its_target_on_first_call_only(target_module: str) -> None:
    from pydantic import Field

    from eebench.params import Params

    class ThingParams(Params):
        size: int = Field(1, ge=1)

    factory = lazy(f"{target_module}:Thing", params=ThingParams, default_calibrator="shared-threshold")
    assert declared_params(factory) is ThingParams
    assert declared_attribute(factory, "default_calibrator") == "shared-threshold"
    assert declared_attribute(factory, "for_methods") is None
    assert check_params(factory, {"size": 3}, where="suite.yaml", key="methods[0].params") == {"size": 3}
    assert inspect.unwrap(factory) is factory and factory.__name__ == "Thing"
    assert target_module not in sys.modules  # nothing above imported it
    thing = factory(size=3)
    assert target_module in sys.modules and type(thing).__name__ == "Thing" and thing.size == 3
    assert factory.strict is True and resolve(factory) is sys.modules[target_module].Thing
    factory(size=4)
    assert builtins.eebench_test_lazy_imports == 1


def test_an_attribute_not_given_up_front_is_read_from_the_target(target_module: str) -> None:
    factory = lazy(f"{target_module}:Thing")
    assert target_module not in sys.modules
    assert factory.strict is True and target_module in sys.modules
    assert "size" in inspect.signature(factory).parameters  # no params given: the target's signature is the check

    class Bigger(factory):  # subclassing a registered factory subclasses its target
        strict = False

    assert issubclass(Bigger, resolve(factory)) and Bigger(size=2).size == 2


@pytest.mark.parametrize(("reference", "expected"), [
    ("eebench_test_no_such_module:Thing", "module 'eebench_test_no_such_module' is not installed"),
    ("{module}:Nope", "has no attribute 'Nope'"),
    ("{module}:NOT_CALLABLE", "is a int, not callable"),
])
def test_a_bad_reference_is_one_line_naming_it(target_module: str, reference: str, expected: str) -> None:
    reference = reference.format(module=target_module)
    factory = lazy(reference)
    with pytest.raises(EebenchError) as caught:
        factory()
    message = str(caught.value)
    assert f"'{reference}'" in message and expected in message and "\n" not in message


def test_a_module_that_fails_to_import_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eebench_test_lazy_broken.py").write_text("raise RuntimeError('half installed\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EebenchError, match=r"eebench_test_lazy_broken:X': RuntimeError: half installed$"):
        lazy("eebench_test_lazy_broken:X")()


def test_lazy_refuses_a_malformed_reference() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        lazy("no_colon_here")
    with pytest.raises(TypeError, match="pydantic model"):
        lazy("json:dumps", params=dict)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- third parties and built-ins


def fake_lazy_distribution(site: Path) -> None:
    """An installed third-party plugin registering lazily: a light manifest and a method module."""
    info = site / "eebench_lazyexit-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eebench-lazyexit\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[eebench]\nlazyexit = eebench_test_lazyexit_manifest\n")
    (site / "eebench_test_lazyexit_manifest.py").write_text(textwrap.dedent("""
        from pydantic import Field

        from eebench import hookimpl
        from eebench.lazy import lazy
        from eebench.params import Params


        class LazyExitParams(Params):
            patience: int = Field(2, ge=1)


        class SearchParams(Params):
            pass


        @hookimpl
        def register_exit_strategies(register):
            register("lazy-exit", lazy("eebench_test_lazyexit_method:LazyExit", params=LazyExitParams,
                                       default_calibrator="lazy-exit-search"))


        @hookimpl
        def register_calibrators(register):
            register("lazy-exit-search", lazy("eebench_test_lazyexit_method:Search", params=SearchParams,
                                              for_methods=("lazy-exit",)))
    """))
    (site / "eebench_test_lazyexit_method.py").write_text("raise ImportError('the method module must stay unread')\n")


def test_a_third_party_lazy_plugin_validates_without_importing_its_method(site: Path, tmp_path: Path) -> None:
    fake_lazy_distribution(site)
    registry = load_registry()
    assert registry.owners["exit_strategies"]["lazy-exit"] == "eebench-lazyexit"
    payload = {"name": "lazy", "datasets": [{"name": "fashion-mnist"}],
               "backbones": [{"name": "resnet20", "recipe": {"epochs": 1}}],
               "methods": [{"name": "lazy-exit", "params": {"patience": 3}}, {"name": "e2cm"}],
               "budgets": [{"name": "epochs"}], "targets": [0.5]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(payload))
    check_plugins(load_suite(str(path)), registry, str(path))  # its Params and default calibrator, no import
    payload["methods"][0]["params"] = {"patience": 0}
    path.write_text(yaml.safe_dump(payload))
    with pytest.raises(EebenchError, match=r"methods\[0\]\.params\.patience: patience must be >= 1, got 0"):
        check_plugins(load_suite(str(path)), registry, str(path))
    payload["methods"][0]["params"] = {}
    payload["methods"][1]["calibrator"] = {"name": "lazy-exit-search"}
    path.write_text(yaml.safe_dump(payload))
    with pytest.raises(EebenchError, match="calibrator 'lazy-exit-search' calibrates only lazy-exit, not 'e2cm'"):
        check_plugins(load_suite(str(path)), registry, str(path))
    assert "eebench_test_lazyexit_method" not in sys.modules


def test_a_calibrator_for_method_classes_still_serves_their_lazy_subclasses(tmp_path: Path) -> None:
    from eebench_plugins.e2cm import E2CM

    class E2CMOnly:
        for_methods = (E2CM,)  # a third party naming classes, not registered names

        def __init__(self) -> None:
            pass

    kit = load_registry()
    kit.factories["calibrators"]["e2cm-only"] = E2CMOnly
    payload = {"name": "cls", "datasets": [{"name": "fashion-mnist"}],
               "backbones": [{"name": "resnet20", "recipe": {"epochs": 1}}],
               "methods": [{"name": "e2cm", "calibrator": {"name": "e2cm-only"}}],
               "budgets": [{"name": "epochs"}], "targets": [0.5]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(payload))
    assert isinstance(kit.factories["exit_strategies"]["e2cm"], LazyFactory)
    check_plugins(load_suite(str(path)), kit, str(path))  # the lazy e2cm is resolved to compare classes
    payload["methods"][0]["name"] = "sdn"
    path.write_text(yaml.safe_dump(payload))
    with pytest.raises(EebenchError, match="calibrates only e2cm, not 'sdn'"):
        check_plugins(load_suite(str(path)), kit, str(path))


def test_every_built_in_declares_what_its_implementation_has() -> None:
    """The manifests' Params, default_calibrator and for_methods are the implementations' own."""
    registry = default_registry()
    for kind, table in registry.factories.items():
        for name, factory in table.items():
            if registry.owners[kind][name] != "eebench":
                continue
            inner = getattr(factory, "func", factory)  # the backbones bind a depth or architecture
            assert isinstance(inner, LazyFactory), (kind, name)
            given = {key: value for key, value in vars(inner).items() if not key.startswith("_")}
            target = resolve(inner)
            if "Params" in given and isinstance(target, type):
                assert target.Params is given["Params"], (kind, name)
            elif "Params" in given:
                assert declared_params(target) in (given["Params"], None), (kind, name)
            for attribute in ("default_calibrator", "for_methods"):
                if hasattr(target, attribute) or attribute in given:
                    assert given.get(attribute) == getattr(target, attribute, None), (kind, name, attribute)


def test_bwds_default_lambdas_are_torch_logspace_to_the_bit() -> None:
    import torch

    from eebench_plugins.manifests.bwds import DEFAULT_LAMBDAS

    assert DEFAULT_LAMBDAS == tuple(float(v) for v in torch.logspace(-4, 1, 25, dtype=torch.float64))
