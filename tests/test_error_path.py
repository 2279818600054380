"""One error path: plugins raise ``EebenchError`` with keys relative to their parameters, the core
locates them (``methods[0].params.lr``), and every training loop stops on a NaN loss in one line."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

from eebench.api import EebenchError, check_finite_loss
from eebench.costs import StageCosts
from eebench.datasets import TensorImageDataset
from eebench.errors import build_plugin, plugin_errors
from eebench.strategy import MethodContext
from eebench_plugins.budgets import SamplesBudget
from eebench_plugins.internal_classifiers import InternalClassifier

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)
CLASSES = 4


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------------
# the core locates a plugin's relative key


def test_build_plugin_prefixes_a_relative_key_with_the_params_path() -> None:
    def factory(lr: float = 1.0) -> None:
        raise EebenchError(f"lr must be > 0, got {lr}", key="lr")

    with pytest.raises(EebenchError) as info:
        build_plugin(factory, "suite.yaml", "methods[2].params", params={"lr": -1})
    assert str(info.value) == "suite.yaml: methods[2].params.lr: lr must be > 0, got -1"
    assert (info.value.where, info.value.key) == ("suite.yaml", "methods[2].params.lr")

    def indexed() -> None:
        raise EebenchError("must be >= 0", key="[1]")

    with pytest.raises(EebenchError, match=r"^suite.yaml: budgets\[0\].params\[1\]: must be >= 0$"):
        build_plugin(indexed, "suite.yaml", "budgets[0].params")

    def weights() -> None:
        raise EebenchError("cannot load", key="weights")

    with pytest.raises(EebenchError, match=r"^suite.yaml: backbones\[0\].params.weights: cannot load$"):
        build_plugin(weights, "suite.yaml", "backbones[0]", params_key="backbones[0].params")


def test_build_plugin_keeps_a_keyless_error_at_the_plugin_and_a_located_one_as_is() -> None:
    def keyless() -> None:
        raise EebenchError("no exit point fits")

    def located() -> None:
        raise EebenchError("bad file", where="other.yaml", key="x")

    def rejects() -> None:
        raise ValueError("first line\nsecond line")

    with pytest.raises(EebenchError, match=r"^suite.yaml: methods\[0\].params: no exit point fits$"):
        build_plugin(keyless, "suite.yaml", "methods[0].params")
    with pytest.raises(EebenchError, match="^other.yaml: x: bad file$"):
        build_plugin(located, "suite.yaml", "methods[0].params")
    with pytest.raises(EebenchError) as info:
        build_plugin(rejects, "suite.yaml", "methods[0].params")
    assert one_line(info.value) == "suite.yaml: methods[0].params: first line; expected valid parameter values"


def test_plugin_errors_locates_fit_errors_at_the_method_and_its_params() -> None:
    with pytest.raises(EebenchError) as info, plugin_errors("s.yaml", "methods[1]", params_key="methods[1].params"):
        check_finite_loss(torch.tensor(float("nan")), "SDN IC loss after 64 samples")
    assert str(info.value) == ("s.yaml: methods[1].params.lr: SDN IC loss after 64 samples is nan; expected a "
                               "finite loss (try a lower lr)")
    with pytest.raises(EebenchError, match=r"^s.yaml: methods\[1\]: the budget handed out nothing$"), \
            plugin_errors("s.yaml", "methods[1]", params_key="methods[1].params"):
        raise EebenchError("the budget handed out nothing")
    with pytest.raises(KeyError), plugin_errors("s.yaml", "methods[1]"):  # not a user error: propagates as is
        raise KeyError("bug")


def test_check_finite_loss_accepts_finite_tensors_and_numbers() -> None:
    check_finite_loss(torch.tensor(2.5, requires_grad=True) * 2, "loss")
    check_finite_loss(0.0, "loss")
    for bad in (float("inf"), -math.inf, torch.tensor(float("nan")), torch.tensor([float("inf")])):
        with pytest.raises(EebenchError, match="expected a finite loss") as info:
            check_finite_loss(bad, "a loss", key="dec_lr", hint="try a lower dec_lr")
        assert info.value.key == "dec_lr" and "try a lower dec_lr" in one_line(info.value)


# ------------------------------------------------------------------------------------------
# every training loop stops on a NaN loss: a tiny backbone and random data


@pytest.fixture(scope="module")
def tiny(registry):
    torch.manual_seed(0)
    backbone = registry.get("backbones", "resnet20")(CLASSES, SHAPE).eval()
    generator = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randn(48, *SHAPE, generator=generator),
                              torch.arange(48) % CLASSES)
    return backbone, StageCosts.measure(backbone, SHAPE), data


def make(tiny, factory, **params):
    import copy

    backbone, costs, data = tiny
    model = copy.deepcopy(backbone)
    context = MethodContext(CLASSES, SHAPE, costs, torch.device("cpu"), seed=0, batch_size=16, train_batch_size=16,
                            backbone_key=f"tiny-{id(tiny)}")
    budget = SamplesBudget(48)
    budget.bind(len(data))
    return factory(model, context, **params), budget, data


def nan_ics(monkeypatch: pytest.MonkeyPatch) -> None:
    original = InternalClassifier.forward_pooled

    def poisoned(self, pair, extra=None):
        return original(self, pair, extra) * float("nan")

    monkeypatch.setattr(InternalClassifier, "forward_pooled", poisoned)


def fit_error(strategy, budget, data) -> EebenchError:
    budget.start()
    with pytest.raises(EebenchError) as info:
        strategy.fit(data, budget)
    one_line(info.value)
    assert info.value.where is None, "a plugin leaves where to the core"
    return info.value


def test_sdn_stops_on_a_nan_loss(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from eebench_plugins.sdn import SDN

    nan_ics(monkeypatch)
    error = fit_error(*make(tiny, SDN))
    assert error.key == "lr"
    assert str(error) == "lr: SDN IC loss after 0 samples is nan; expected a finite loss (try a lower lr)"


def test_sdn_stops_when_a_huge_lr_blows_the_ics_up(tiny) -> None:
    """No monkeypatching: lr 1e30 drives the ICs' α and weights to ±1e30 and the logits to inf − inf."""
    from eebench_plugins.sdn import SDN

    error = fit_error(*make(tiny, SDN, lr=1e30))
    assert error.key == "lr" and "expected a finite loss" in str(error)


def test_e2cm_sdn_stops_on_a_nan_loss(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from eebench_plugins.e2cm_sdn import E2CMSDN

    nan_ics(monkeypatch)
    error = fit_error(*make(tiny, E2CMSDN))
    assert error.key == "lr" and str(error).startswith("lr: E2CMSDN IC loss after 0 samples is nan")


@pytest.mark.parametrize("schedule", ["per-exit", "ics-first"])
def test_bwds_stops_on_a_nan_ic_loss(tiny, monkeypatch: pytest.MonkeyPatch, schedule: str) -> None:
    from eebench_plugins.bwds import BWDS

    nan_ics(monkeypatch)
    error = fit_error(*make(tiny, BWDS, schedule=schedule, lambdas=[0.1, 1.0]))
    assert error.key == "lr" and "IC" in str(error) and "is nan; expected a finite loss" in str(error)


def test_bwds_stops_on_a_nan_decision_function_loss(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from eebench_plugins import bwds

    monkeypatch.setattr(bwds.DecisionFunctions, "logits",
                        lambda self, j, inputs: torch.full((self.weight[j].shape[0], inputs.shape[0]), float("nan"),
                                                           requires_grad=True))
    error = fit_error(*make(tiny, bwds.BWDS, lambdas=[0.1, 1.0]))
    assert str(error) == ("policy_lr: BWDS decision function 5 loss after 0 samples is nan; expected a finite loss "
                          "(try a lower policy_lr)")


def test_bwds_blames_the_ic_lr_when_the_decision_inputs_blow_up(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge IC lr (schedule per-exit trains IC j right before its policy) shows up as NaN policy inputs."""
    from eebench_plugins import bwds

    monkeypatch.setattr(bwds, "policy_inputs", lambda logits: torch.full((logits.shape[0], logits.shape[1] + 2),
                                                                         float("nan")))
    error = fit_error(*make(tiny, bwds.BWDS, lambdas=[0.1, 1.0]))
    assert str(error) == ("lr: BWDS decision function 5 loss after 0 samples (IC 5 outputs are not finite) is nan; "
                          "expected a finite loss (try a lower lr)")


def test_joint_training_stops_on_a_nan_loss_at_the_lr_key(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from eebench_plugins.branchynet import BranchyNet

    strategy, budget, data = make(tiny, BranchyNet)
    monkeypatch.setattr(strategy, "loss", lambda logits, y: torch.tensor(float("nan"), requires_grad=True))
    error = fit_error(strategy, budget, data)
    assert str(error) == "lr: branchynet training loss after 0 samples is nan; expected a finite loss (try a lower lr)"


def test_class_exclusion_raises_eebench_errors_in_fit(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from eebench_plugins.class_exclusion import ClassExclusion

    strategy, budget, data = make(tiny, ClassExclusion)
    monkeypatch.setattr(strategy, "loss", lambda *args: torch.tensor(float("inf"), requires_grad=True))
    error = fit_error(strategy, budget, data)
    assert error.key == "lr" and "class exclusion training loss after 0 samples is inf" in str(error)

    strategy, budget, data = make(tiny, ClassExclusion, from_scratch=True)
    error = fit_error(strategy, budget, data)  # no harness: no fresh backbone
    assert error.key == "from_scratch" and "needs a fresh backbone" in str(error)


def test_class_exclusion_search_on_another_method_is_one_line() -> None:
    from eebench.trace import ExitTrace
    from eebench_plugins.class_exclusion import ClassExclusionSearch

    trace = ExitTrace(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(EebenchError, match="calibrates only the class-exclusion method") as info:
        ClassExclusionSearch().thresholds(trace, None, torch.Generator())
    one_line(info.value)


@pytest.mark.parametrize(("module", "phase_key"), [("pretrain", "lr"), ("train", "dec_lr")])
def test_dec_phases_name_the_lr_that_drives_them(module: str, phase_key: str) -> None:
    import importlib

    from eebench_plugins.dec.loop import check_finite

    source = (ROOT / "plugins" / "dec" / f"{module}.py").read_text()
    assert f'"{phase_key}")' in source
    importlib.import_module(f"eebench_plugins.dec.{module}")
    with pytest.raises(EebenchError) as info:
        check_finite(torch.tensor(float("nan")), "DEC_large KL", 7, phase_key)
    assert info.value.key == phase_key
    assert one_line(info.value) == (f"{phase_key}: DEC DEC_large KL loss at iteration 7 is nan; expected a finite "
                                    f"loss (try a lower {phase_key})")


def test_example_patience_plugin_stops_on_a_nan_loss(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "eebench-patience"))
    sys.modules.pop("eebench_patience.strategy", None)
    from eebench_patience.strategy import PatienceExit

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, logits, y: logits.sum() * float("nan"))
    error = fit_error(*make(tiny, PatienceExit))
    assert str(error) == "lr: patience IC loss after 0 samples is nan; expected a finite loss (try a lower lr)"


# ------------------------------------------------------------------------------------------
# guards over the source: every loop checks its loss, no fit raises a bare built-in error

PLUGIN_SOURCES = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
BARE = {"ValueError", "RuntimeError", "FloatingPointError", "TypeError", "ZeroDivisionError", "AssertionError"}


def test_every_plugin_training_loop_checks_its_loss() -> None:
    missing = [str(p.relative_to(ROOT)) for p in PLUGIN_SOURCES
               if ".backward()" in p.read_text() and "check_finite" not in p.read_text()]
    assert missing == [], f"training loops without check_finite_loss: {missing}"
    for name in ("internal_classifiers.py", "bwds.py", "joint_training.py", "class_exclusion.py"):
        assert "check_finite_loss(" in (ROOT / "plugins" / name).read_text(), name


def test_no_fit_raises_a_bare_builtin_error() -> None:
    found = []
    for path in PLUGIN_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not (node.name == "fit" or node.name.startswith(
                    ("_train", "train_", "reset_to_fresh", "thresholds"))):
                continue
            for raise_ in (n for n in ast.walk(node) if isinstance(n, ast.Raise) and n.exc is not None):
                call = raise_.exc.func if isinstance(raise_.exc, ast.Call) else raise_.exc
                if isinstance(call, ast.Name) and call.id in BARE:
                    found.append(f"{path.relative_to(ROOT)}:{raise_.lineno} {node.name} raises {call.id}")
    assert found == [], found
