"""The base backbone: trained once per (dataset, backbone, recipe, seed) and cached; checkpoints load
with weights_only; a damaged cache entry is retrained, never fatal."""

from __future__ import annotations

import pytest
import torch

from eebench.basenet import cache_dir, content_hash, prepare_backbone
from eebench.errors import EebenchError
from eebench.suite import Recipe


def _prepare(registry, small_fmnist, recipe: Recipe, payload: dict, checkpoint: str | None = None):
    bundle, train, test = small_fmnist
    torch.manual_seed(0)
    model = registry.get("backbones", "resnet20")(bundle.num_classes, bundle.input_shape)
    info = prepare_backbone(model, payload, train, test, recipe, augment=None, seed=0, device=torch.device("cpu"),
                            checkpoint=checkpoint, eval_batch_size=100, where="suite.yaml", key="backbones[0]")
    return model, info


def test_cache_hit_miss_and_damaged_entry(registry, small_fmnist) -> None:
    recipe = Recipe(epochs=0.25, batch_size=50, lr=0.05)
    payload = {"test": "basenet-cache", "recipe": recipe.model_dump()}
    first, trained = _prepare(registry, small_fmnist, recipe, payload)
    assert not trained.cached and trained.source == "trained" and trained.train_samples == 50
    again, cached = _prepare(registry, small_fmnist, recipe, payload)
    assert cached.cached and cached.key == trained.key and cached.test_accuracy == trained.test_accuracy
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name

    other = Recipe(epochs=0.25, batch_size=50, lr=0.01)
    _, changed = _prepare(registry, small_fmnist, other, {**payload, "recipe": other.model_dump()})
    assert not changed.cached and changed.key != trained.key

    (cache_dir() / "backbones" / f"{content_hash(payload)}.json").write_text('{"test_acc')  # truncated
    _, retrained = _prepare(registry, small_fmnist, recipe, payload)
    assert not retrained.cached and retrained.key == trained.key


def test_checkpoint_loads_with_weights_only(registry, small_fmnist, trained_resnet20, tmp_path) -> None:
    path = tmp_path / "resnet20.pt"
    torch.save({"state_dict": trained_resnet20.state_dict()}, path)
    model, info = _prepare(registry, small_fmnist, Recipe(epochs=1), {"test": "checkpoint"}, str(path))
    assert info.source == f"checkpoint {path}" and info.train_samples == 0
    for name, tensor in trained_resnet20.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": trained_resnet20.state_dict(), "model": trained_resnet20}, pickled)
    with pytest.raises(EebenchError, match="backbones\\[0\\]"):  # a whole pickled module is refused
        _prepare(registry, small_fmnist, Recipe(epochs=1), {"test": "checkpoint"}, str(pickled))
