"""`eebench validate` rejects what `run` would reject or crash on; hostile YAML; names that become files.

Every bad suite ends in one line naming the file, the key and what was expected, exit code 2,
and `run` refuses the same values with the same line before any work.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import pytest
import yaml
from test_cli import TINY

from eebench.cli import main
from eebench.errors import EebenchError, build_plugin
from eebench.params import Params, check_params, declared_params, params_model
from eebench.plugins import Registry, default_registry
from eebench.strategy import ExitStrategy
from eebench.suite import (
    MAX_CELL_ID_BYTES,
    MAX_SUITE_BYTES,
    MAX_YAML_NODES,
    SEED_MAX,
    check_plugins,
    expand,
    load_suite,
)

ROOT = Path(__file__).resolve().parents[1]


def suite(**changes) -> dict:
    out = json.loads(json.dumps(TINY))
    out.update(changes)
    return out


def write(tmp_path: Path, payload: dict | str | bytes, name: str = "suite.yaml") -> str:
    path = tmp_path / name
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        path.write_text(payload if isinstance(payload, str) else yaml.safe_dump(payload, allow_unicode=True))
    return str(path)


def error_line(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("eebench: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def rejected(tmp_path: Path, capsys: pytest.CaptureFixture, payload, key: str, expectation: str) -> str:
    path = write(tmp_path, payload)
    code, line = error_line(["validate", path], capsys)
    assert code == 2
    assert f"{path}: {key}: " in line and expectation in line, line
    return line


# ------------------------------------------------------------------------- numbers and seeds

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("payload", "key", "expectation"),
    [
        (suite(targets=[0.5, NAN]), "targets[1]", "finite number"),
        (suite(targets=[INF]), "targets[0]", "finite number"),
        (suite(budgets=[{"name": "epochs", "params": {"epochs": INF}}]), "budgets[0].params.epochs",
         "epochs must be a finite number, got inf"),
        (suite(budgets=[{"name": "seconds", "params": {"seconds": NAN}}]), "budgets[0].params.seconds",
         "finite number"),
        (suite(backbones=[{"name": "resnet20", "recipe": {"epochs": NAN}}]), "backbones[0].recipe.epochs",
         "finite number"),
        (suite(backbones=[{"name": "resnet20", "params": {"width": INF}}]), "backbones[0].params.width",
         "finite number"),
        (suite(methods=[{"name": "sdn", "params": {"lr": NAN}}]), "methods[0].params.lr",
         "lr must be a finite number, got nan"),
        (suite(methods=[{"name": "bwds", "params": {"lambdas": [0.1, INF]}}]), "methods[0].params.lambdas[1]",
         "finite number"),
        (suite(methods=[{"name": "dec-e2cm", "params": {"recipe": {"preset": "quick", "tol": NAN}}}]),
         "methods[0].params.recipe.tol", "finite number"),
        (suite(methods=[{"name": "e2cm", "calibrator": {"name": "per-exit-bisection",
                                                        "params": {"tolerance": NAN}}}]),
         "methods[0].calibrator.params.tolerance", "finite number"),
        # a plugin without a schema: every number in its params must still be finite
        (suite(datasets=[{"name": "fashion-mnist", "params": {"extra": {"deep": [1, NAN]}}}]),
         "datasets[0].params.extra.deep[1]", "finite number"),
    ],
)
def test_nan_and_infinite_numbers_are_refused_everywhere(tmp_path, capsys, payload, key, expectation) -> None:
    rejected(tmp_path, capsys, payload, key, expectation)


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**32, 2**64])
def test_seeds_outside_the_rng_range_are_refused(tmp_path, capsys, seed) -> None:
    line = rejected(tmp_path, capsys, suite(seeds=[0, seed]), "seeds", f"seed {seed} is out of range")
    assert f"[0, {SEED_MAX}]" in line


def test_the_largest_seed_and_its_derived_seeds_are_valid_for_every_rng(tmp_path) -> None:
    import numpy as np
    import torch

    path = write(tmp_path, suite(seeds=[0, SEED_MAX]))
    assert main(["validate", path]) == 0
    for derived in (SEED_MAX, SEED_MAX + 7919):  # runner.make_splits' holdout seed
        np.random.RandomState(derived)
        torch.Generator().manual_seed(derived)


def test_duplicate_seeds_are_refused(tmp_path, capsys) -> None:
    rejected(tmp_path, capsys, suite(seeds=[1, 2, 1]), "seeds", "seed 1 appears twice")


# ------------------------------------------------------------------------- plugin parameters


@pytest.mark.parametrize(
    ("method", "key", "expectation"),
    [
        ({"name": "class-exclusion", "calibrator": {"name": "class-exclusion-search",
                                                    "params": {"tolerances": [-1]}}},
         "methods[0].calibrator.params.tolerances", "tolerances must be accuracy drops in [0, 1], got -1"),
        ({"name": "class-exclusion", "calibrator": {"name": "class-exclusion-search", "params": {"step": 1e-9}}},
         "methods[0].calibrator.params.step", "step must be >= 0.0001"),
        ({"name": "e2cm", "calibrator": {"name": "per-exit-bisection", "params": {"targets": 0}}},
         "methods[0].calibrator.params.targets", "targets must be >= 1, got 0"),
        ({"name": "sdn", "calibrator": {"name": "shared-threshold", "params": {"points": "many"}}},
         "methods[0].calibrator.params.points", "points must be an integer"),
        ({"name": "e2cm", "calibrator": {"name": "class-exclusion-search"}}, "methods[0].calibrator",
         "calibrates only class-exclusion, not 'e2cm'"),
        ({"name": "sdn", "params": {"fractions": [0.2, 1.5]}}, "methods[0].params.fractions",
         "fractions must be a non-empty list of numbers in (0, 1]"),
        ({"name": "sdn", "params": {"fallback": "first"}}, "methods[0].params.fallback",
         "fallback must be one of 'final' or 'most_confident', got 'first'"),
        ({"name": "e2cm", "params": {"pool_to": 0}}, "methods[0].params.pool_to", "pool_to must be >= 1, got 0"),
        ({"name": "e2cm", "params": {"pool_size": 2}}, "methods[0].params.pool_size",
         "unknown parameter 'pool_size'; expected parameters among: pool_to, auto_pool_above, count_softmax"),
        ({"name": "e2cm+sdn", "params": {"rules": ["same-class", "majority"]}}, "methods[0].params.rules[1]",
         "must be one of 'same-class', 'confidence', 'or' or 'or-e2cm-class'"),
        ({"name": "e2cm+sdn", "params": {"grid": 0}}, "methods[0].params.grid", "grid must be >= 1"),
        ({"name": "bwds", "params": {"lambdas": [0.1, 0]}}, "methods[0].params.lambdas",
         "lambdas must be a non-empty list of positive numbers"),
        ({"name": "bwds", "params": {"schedule": "joint"}}, "methods[0].params.schedule",
         "schedule must be one of 'per-exit' or 'ics-first'"),
        ({"name": "branchynet", "params": {"weights": [1, -1, 2]}}, "methods[0].params.weights",
         "weights must be 3 non-negative numbers"),
        ({"name": "branchynet", "params": {"weights": "heavy"}}, "methods[0].params.weights",
         "weights must be one of e2cm, equal, paper"),
        ({"name": "branchynet", "params": {"second_at": 1.0}}, "methods[0].params.second_at",
         "second_at must be < 1"),
        ({"name": "eenet", "params": {"num_ee": 0}}, "methods[0].params.num_ee", "num_ee must be >= 1"),
        ({"name": "eenet", "params": {"distribution": "cubic"}}, "methods[0].params.distribution",
         "distribution must be one of"),
        ({"name": "class-exclusion", "params": {"expansion": 0}}, "methods[0].params.expansion",
         "expansion must be >= 1"),
        ({"name": "class-exclusion", "params": {"exit_stages": [3, 1]}}, "methods[0].params.exit_stages",
         "increasing"),
        ({"name": "dec-e2cm", "params": {"recipe": "fast"}}, "methods[0].params.recipe.preset",
         "must be one of 'paper' or 'quick', got 'fast'"),
        ({"name": "dec-e2cm", "params": {"recipe": {"preset": "quick", "dropout": 1.0}}},
         "methods[0].params.recipe.dropout", "recipe.dropout must be < 1"),
        ({"name": "dec-e2cm", "params": {"recipe": {"preset": "quick", "epochs": 3}}},
         "methods[0].params.recipe.epochs", "unknown parameter"),
        ({"name": "dec-e2cm", "params": {"recipe": "quick", "lr": 0.1}}, "methods[0].params",
         "lr is a DEC recipe field; expected it under recipe"),
        ({"name": "dec-e2cm", "params": {"prediction": "knn"}}, "methods[0].params.prediction",
         "prediction must be one of 'dec' or 'e2cm'"),
    ],
)
def test_method_and_calibrator_parameters_are_checked_by_validate(tmp_path, capsys, method, key,
                                                                  expectation) -> None:
    rejected(tmp_path, capsys, suite(methods=[method]), key, expectation)


@pytest.mark.parametrize(
    ("changes", "key", "expectation"),
    [
        ({"budgets": [{"name": "epochs", "params": {"epochs": 1e300}}]}, "budgets[0].params.epochs",
         "epochs must be <= 1000000"),
        ({"budgets": [{"name": "samples", "params": {}}]}, "budgets[0].params.samples",
         "required parameter 'samples' is missing"),
        ({"backbones": [{"name": "dec", "params": {"dims": [500]}}]}, "backbones[0].params.dims",
         "dims must have at least 2 items"),
        ({"backbones": [{"name": "resnet20", "params": {"width": 0}}]}, "backbones[0].params.width",
         "width must be > 0"),
        ({"datasets": [{"name": "fashion-mnist", "params": {"root": 5}}]}, "datasets[0].params.root",
         "root must be a string, got 5"),
        ({"datasets": [{"name": "cifar10", "params": {"download": "yes"}}]}, "datasets[0].params.download",
         "download must be true or false"),
        ({"datasets": [{"name": "image-folder", "params": {"root": "x", "image_size": "224"}}]},
         "datasets[0].params.image_size", "image_size must be an integer"),
        ({"datasets": [{"name": "image-folder", "params": {"root": "x", "std": [0.2, 0, 0.2]}}]},
         "datasets[0].params.std", "std must be one number or three numbers > 0"),
        ({"datasets": [{"name": "svhn", "params": {"extras": True}}]}, "datasets[0].params.extras",
         "unknown parameter 'extras'; expected parameters among: root, download, extra"),
    ],
)
def test_dataset_budget_and_backbone_parameters_are_checked_by_validate(tmp_path, capsys, changes, key,
                                                                         expectation) -> None:
    rejected(tmp_path, capsys, suite(**changes), key, expectation)


@pytest.mark.parametrize(
    ("method", "key", "expectation"),
    [
        ({"name": "class-exclusion", "calibrator": {"name": "class-exclusion-search",
                                                    "params": {"tolerances": [-1]}}},
         "methods[0].calibrator.params.tolerances", "[0, 1]"),
        ({"name": "sdn", "params": {"lr": 0}}, "methods[0].params.lr", "lr must be > 0"),
        ({"name": "dec-e2cm", "params": {"recipe": {"preset": "quick", "batch_size": 0}}},
         "methods[0].params.recipe.batch_size", "must be >= 1"),
    ],
)
def test_run_refuses_what_validate_refuses_with_the_same_line_before_any_work(tmp_path, capsys, method, key,
                                                                            expectation) -> None:
    path = write(tmp_path, suite(methods=[method]))
    code, validate_line = error_line(["validate", path], capsys)
    run_dir = tmp_path / "run"
    run_code, run_line = error_line(["run", path, "--out", str(run_dir), "--leaderboards", str(tmp_path / "b")],
                                    capsys)
    assert code == run_code == 2
    assert validate_line == run_line and f"{path}: {key}: " in run_line and expectation in run_line, run_line
    assert not list(run_dir.glob("cells/*.json"))  # nothing was computed


def test_run_builds_plugins_from_the_validated_values() -> None:
    """What validate accepts (YAML's '1e-3' is a string) is what the plugin is built with, converted."""
    registry = default_registry()
    epochs = registry.get("budgets", "epochs")
    assert check_params(epochs, {"epochs": "2"}, where="s.yaml", key="budgets[0].params") == {"epochs": 2.0}
    budget = build_plugin(epochs, "s.yaml", "budgets[0].params", params={"epochs": "2"})
    assert budget.epochs == 2.0
    calibrator = build_plugin(registry.get("calibrators", "class-exclusion-search"), "s.yaml", "k",
                              params={"tolerances": ["0.01", 0.1]})
    assert calibrator.tolerances == [0.01, 0.1]
    with pytest.raises(EebenchError, match=r"^s\.yaml: budgets\[0\]\.params\.epochs: epochs must be > 0"):
        build_plugin(epochs, "s.yaml", "budgets[0].params", params={"epochs": 0})
    dec = registry.get("exit_strategies", "dec-e2cm")
    kwargs = check_params(dec, {"recipe": {"preset": "quick", "lr": 0.01}}, where="s", key="k", skip=2)
    recipe = kwargs["recipe"]
    assert recipe.preset == "quick" and recipe.lr == 0.01 and recipe.pretrain_iterations == 300


def test_every_built_in_plugin_declares_a_schema_whose_defaults_match_its_constructor() -> None:
    registry = default_registry()
    built_in = {kind: [n for n, owner in registry.owners[kind].items() if owner == "eebench"]
                for kind in ("exit_strategies", "calibrators", "budgets", "datasets")}
    assert built_in["exit_strategies"] and built_in["calibrators"] and built_in["budgets"]
    for kind, names in built_in.items():
        for name in names:
            factory = registry.get(kind, name)
            model = declared_params(factory)
            assert model is not None and issubclass(model, Params), (kind, name)
            signature = inspect.signature(factory)
            for field, info in model.model_fields.items():
                assert field in signature.parameters, (name, field)
                default = signature.parameters[field].default
                if default is inspect.Parameter.empty or field == "recipe":
                    continue
                declared = info.get_default(call_default_factory=True)
                expected = list(default) if isinstance(default, tuple) else default
                assert declared == expected, (name, field, declared, expected)
    for name in ("resnet20", "dec"):
        assert declared_params(registry.get("backbones", name)) is not None


def test_third_party_plugins_declare_a_schema_or_keep_the_signature_check(tmp_path, capsys) -> None:
    from pydantic import Field

    class MineParams(Params):
        lr: float = Field(1e-3, gt=0)

    class Mine(ExitStrategy):
        Params = MineParams

        def __init__(self, backbone, context, lr: float = 1e-3) -> None:
            super().__init__(backbone, context)

    class Child(Mine):  # a new constructor without a schema: its signature is the check, not Mine's model
        def __init__(self, backbone, context, lr: float = 1e-3, depth: int = 2) -> None:
            super().__init__(backbone, context, lr)

    @params_model(MineParams)
    def function_factory(backbone, context, lr: float = 1e-3):
        raise AssertionError("not built by validate")

    assert declared_params(Mine) is MineParams and declared_params(Child) is None
    assert declared_params(function_factory) is MineParams
    assert declared_params(functools.partial(function_factory)) is MineParams
    wrapped = functools.wraps(Mine, updated=())(lambda *a, **k: Mine(*a, **k))  # as eebench.testing wraps
    assert declared_params(wrapped) is MineParams
    with pytest.raises(EebenchError, match=r"methods\[0\]\.params\.lr: lr must be > 0"):
        check_params(Mine, {"lr": -1}, where="s.yaml", key="methods[0].params", skip=2)
    assert check_params(Child, {"depth": 3}, where="s.yaml", key="methods[0].params", skip=2) == {"depth": 3}
    with pytest.raises(EebenchError, match="unexpected keyword argument 'width'"):
        check_params(Child, {"width": 3}, where="s.yaml", key="methods[0].params", skip=2)

    registry = default_registry()
    custom = Registry(factories={k: dict(v) for k, v in registry.factories.items()},
                      owners={k: dict(v) for k, v in registry.owners.items()})
    custom.factories["exit_strategies"]["mine"] = function_factory
    path = write(tmp_path, suite(methods=[{"name": "mine", "params": {"lr": 0}}]))
    with pytest.raises(EebenchError, match=r"methods\[0\]\.params\.lr: lr must be > 0, got 0"):
        check_plugins(load_suite(path), custom, path)


# ------------------------------------------------------------------------- the file itself


def test_non_utf8_files_are_refused(tmp_path, capsys) -> None:
    rest = yaml.safe_dump({k: v for k, v in TINY.items() if k != "name"}).encode()
    payload = b"name: tiny\ndescription: caf\xe9 (latin-1)\n" + rest
    rejected(tmp_path, capsys, payload, "line 2", "byte 0xe9 at offset 27 is not UTF-8; expected a UTF-8")


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("name: tiny\nname: other\n", "name", "lines 1 and 2"),
        ("methods:\n  - name: sdn\n    params: {lr: 0.1, lr: 0.2}\n", "methods[0].params.lr", "lines 3 and 3"),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, capsys, text, key, lines) -> None:
    rest = {k: v for k, v in TINY.items() if k not in ("name", "methods")}
    payload = text + yaml.safe_dump(rest) + ("methods: [{name: e2cm}]\n" if "methods" not in text else "")
    line = rejected(tmp_path, capsys, payload, key, "duplicate key")
    assert lines in line and "expected each key once" in line


def test_merge_keys_and_plain_aliases_still_load(tmp_path) -> None:
    text = (
        "name: tiny\n"
        "datasets: [{name: fashion-mnist, per_class: 10, test_subset: 100}]\n"
        "backbones:\n  - name: resnet20\n    recipe: &recipe {epochs: 1, batch_size: 50}\n"
        "  - name: resnet32\n    recipe: {<<: *recipe, batch_size: 25}\n"
        "methods: [{name: e2cm}]\n"
        "budgets: [{name: epochs, params: &one {epochs: 1}}, {name: epochs, label: again, params: *one}]\n"
        "targets: [0.5]\n"
    )
    loaded = load_suite(write(tmp_path, text))
    assert loaded.backbones[1].recipe.batch_size == 25 and loaded.backbones[1].recipe.epochs == 1
    assert loaded.budgets[1].params == {"epochs": 1}


def test_a_billion_laughs_file_is_refused_at_load_time(tmp_path, capsys) -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(suite(methods=[{"name": "e2cm", "params": {"x": "BOMB"}}]))
    text = text.replace("x: BOMB", "x: *l9")
    assert len(text.encode()) < 2048  # ~1 kB that would expand to 9**9 strings when hashed
    line = rejected(tmp_path, capsys, text, "l5", f"more than {MAX_YAML_NODES:,} YAML nodes")
    assert "alias" in line


def test_a_recursive_alias_is_refused(tmp_path, capsys) -> None:
    text = yaml.safe_dump(suite(methods=[{"name": "e2cm", "params": {"x": "LOOP"}}])).replace(
        "params:\n    x: LOOP", "params: &p\n    x: [*p]")
    rejected(tmp_path, capsys, text, "methods[0].params.x[0]", "recursive")


def test_a_suite_file_over_the_size_limit_is_refused_before_parsing(tmp_path, capsys) -> None:
    text = yaml.safe_dump(TINY) + "# " + "x" * MAX_SUITE_BYTES + "\n"
    rejected(tmp_path, capsys, text, "(file size)", "at most 1,048,576 bytes")


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys) -> None:
    text = yaml.safe_dump(TINY).replace("targets:\n- 0.5", "targets: " + "[" * 5000 + "]" * 5000)
    rejected(tmp_path, capsys, text, "(parse)", "nests too deeply")


# ------------------------------------------------------------------------- names that become file names


@pytest.mark.parametrize(
    ("changes", "key", "expectation"),
    [
        ({"methods": [{"name": "e2cm", "label": "E2CM\nsecond line"}]}, "methods[0].label",
         "control character '\\n'"),
        ({"datasets": [{"name": "fashion-mnist", "label": "F\x1bMNIST"}]}, "datasets[0].label", "control character"),
        ({"backbones": [{"name": "timm:resnet\t18"}]}, "backbones[0].name", "control character"),
        ({"methods": [{"name": "e2cm", "label": "λ" * 33}]}, "methods[0].label", "66 bytes long; expected at most 64"),
        ({"name": ".."}, "name", "starting with a letter or digit"),
        ({"name": "x" * 65}, "name", "1 to 64 letters"),
        ({"methods": [{"name": "e2cm", "label": "E2CM a"}, {"name": "sdn", "label": "e2cm_a"}]},
         "methods[1].label", "map to the same file name"),
        ({"methods": [{"name": "e2cm", "label": "A/B"}, {"name": "sdn", "label": "A:B"}]}, "methods[1].label",
         "'A:B' and 'A/B' (methods[0].label) map to the same file name"),
        ({"methods": [{"name": "e2cm"}, {"name": "e2cm", "params": {"count_softmax": True}}]}, "methods[1].name",
         "method 'e2cm' appears twice"),
        ({"datasets": [{"name": "fashion-mnist", "per_class": 10}, {"name": "fashion-mnist", "per_class": 20}]},
         "datasets[1].name", "dataset 'fashion-mnist' appears twice"),
        ({"backbones": [{"name": "resnet20", "label": "Res Net"}, {"name": "resnet32", "label": "res_net"}]},
         "backbones[1].label", "map to the same file name"),
        ({"budgets": [{"name": "epochs", "label": "one", "params": {"epochs": 1}},
                      {"name": "epochs", "label": "ONE", "params": {"epochs": 1}}]}, "budgets[1].label",
         "map to the same file name"),
    ],
)
def test_names_that_become_file_names_are_checked(tmp_path, capsys, changes, key, expectation) -> None:
    rejected(tmp_path, capsys, suite(**changes), key, expectation)


def test_cell_ids_stay_short_enough_for_a_file_name(tmp_path, capsys) -> None:
    long = {"methods": [{"name": "e2cm", "label": "m" * 64}],
            "budgets": [{"name": "epochs", "label": "b" * 64, "params": {"epochs": 1}}],
            "backbones": [{"name": "timm:" + "n" * 58}], "datasets": [{"name": "fashion-mnist"}]}
    line = rejected(tmp_path, capsys, suite(**long), "methods[0].label", f"at most {MAX_CELL_ID_BYTES} bytes")
    assert "shorten the longest" in line
    fitting = suite(methods=[{"name": "e2cm", "label": "m" * 64}],
                    budgets=[{"name": "epochs", "label": "b" * 64, "params": {"epochs": 1}}], seeds=[SEED_MAX])
    cells = expand(load_suite(write(tmp_path, fitting, "fits.yaml")))
    assert all(len(f"{c.cell_id}.json.tmp".encode()) < 255 for c in cells)


def test_budgets_with_one_label_but_different_params_stay_distinct(tmp_path) -> None:
    budgets = [{"name": "epochs", "params": {"epochs": 1}}, {"name": "epochs", "params": {"epochs": 2}}]
    cells = expand(load_suite(write(tmp_path, suite(budgets=budgets))))
    assert len({c.cell_id for c in cells}) == 2


# ------------------------------------------------------------------------- shipped suites


SHIPPED = sorted(str(p.relative_to(ROOT / "suites")) for p in (ROOT / "suites").rglob("*.yaml"))  # and suites/paper/


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_suite_still_validates_with_the_schemas(name, capsys) -> None:
    path = ROOT / "suites" / name
    assert main(["validate", str(path)]) == 0
    loaded = load_suite(path)
    check_plugins(loaded, default_registry(), str(path))  # what run checks too


def test_the_schemas_leave_shipped_cell_ids_unchanged() -> None:
    """Cell ids (hence resumed runs and cached results) do not move with the parameter schemas."""
    cell = expand(load_suite(ROOT / "suites" / "smoke.yaml"))[0]
    assert cell.cell_id == "fashion-mnist-resnet20-E²CM-epochs-s0-8926557d"
    dec = expand(load_suite(ROOT / "suites" / "unsupervised_dec.yaml"))
    assert dec[0].method.params == {"recipe": "quick"}
