"""Shared fixtures: small real data (a Fashion-MNIST subset) and a briefly trained ResNet-20."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from eebench.progress import set_quiet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_cached(tmp_path_factory: pytest.TempPathFactory):
    """No progress bars in test output; backbones cached in a per-session folder."""
    set_quiet(True)
    os.environ["EEBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def registry():
    from eebench.plugins import default_registry

    return default_registry()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run of suites/smoke.yaml; several tests read its results."""
    from eebench.cli import main

    out = tmp_path_factory.mktemp("smoke")
    code = main(["run", str(ROOT / "suites" / "smoke.yaml"), "--out", str(out / "run"),
                 "--leaderboards", str(out / "boards")])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def small_fmnist(registry):
    """200 training and 300 test images of Fashion-MNIST (seeded)."""
    from eebench.datasets import dataset_labels, seeded_subset_indices, take

    bundle = registry.get("datasets", "fashion-mnist")()
    train = take(bundle.train, seeded_subset_indices(dataset_labels(bundle.train), seed=0, per_class=20))
    test = take(bundle.test, seeded_subset_indices(dataset_labels(bundle.test), seed=0, total=300))
    return bundle, train, test


@pytest.fixture(scope="session")
def trained_resnet20(registry, small_fmnist):
    """A ResNet-20 trained for two epochs on the small subset (weights are CPU tensors)."""
    from eebench.basenet import train_backbone
    from eebench.suite import Recipe

    bundle, train, _ = small_fmnist
    torch.manual_seed(0)
    model = registry.get("backbones", "resnet20")(bundle.num_classes, bundle.input_shape)
    train_backbone(model, train, Recipe(epochs=2, batch_size=32, lr=0.05), augment=None, seed=0,
                   device=torch.device("cpu"))
    return model.eval()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for fake installed plugin distributions (see test_plugins.fake_distribution)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("eebench_test_")]:
        del sys.modules[module]


TWO_SEEDS = {
    "name": "two-seeds",
    "description": "two methods, two seeds, a reference and the Zero-Time-Waste columns; numbers not meaningful",
    "datasets": [{"name": "fashion-mnist", "per_class": 10, "test_subset": 200}],
    "backbones": [{"name": "resnet20", "params": {"width": 0.5}, "recipe": {"epochs": 1, "batch_size": 50}}],
    "methods": [{"name": "e2cm", "label": "E2CM"}, {"name": "sdn", "label": "SDN"}],
    "budgets": [{"name": "epochs", "params": {"epochs": 1}}],
    "seeds": [0, 1],
    "targets": [0.5],
    "reference": "SDN",
    "ztw_columns": True,
}


@pytest.fixture(scope="session")
def two_seed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run of a tiny two-method, two-seed suite with ``reference: SDN`` and ``ztw_columns: true``."""
    import yaml

    from eebench.cli import main

    out = tmp_path_factory.mktemp("two_seeds")
    (out / "suite.yaml").write_text(yaml.safe_dump(TWO_SEEDS, allow_unicode=True))
    code = main(["run", str(out / "suite.yaml"), "--out", str(out / "run"), "--leaderboards", str(out / "boards")])
    assert code == 0
    return out
