"""YAML suites: a validated schema, plugin-name checks, and expansion into cells.

A cell is one (dataset, backbone, method, budget, seed) combination. Its config hash
covers everything that changes its numbers, so a rerun skips cells already done.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from eebench.errors import EebenchError, build_plugin
from eebench.plugins import Registry

Strict = ConfigDict(extra="forbid")


class PluginRef(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or self.name


class DatasetSpec(PluginRef):
    train_subset: PositiveInt | None = None
    per_class: PositiveInt | None = None
    test_subset: PositiveInt | None = None
    calibration: Literal["train", "holdout"] = "train"
    holdout: PositiveInt = 5000


class Recipe(BaseModel):
    """How eebench trains the base backbone (cached by content hash)."""

    model_config = Strict
    epochs: float = Field(3, ge=0)  # 0: left at its plugin's init, for methods that train it themselves (DEC)
    batch_size: PositiveInt = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: bool = True


class BackboneSpec(PluginRef):
    recipe: Recipe = Field(default_factory=Recipe)
    checkpoint: str | None = None


class MethodSpec(PluginRef):
    calibrator: PluginRef | None = None


class Outputs(BaseModel):
    model_config = Strict
    run_dir: str | None = None
    leaderboard_dir: str = "leaderboards"


class Suite(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    notes: list[str] = Field(default_factory=list)
    datasets: list[DatasetSpec] = Field(min_length=1)
    backbones: list[BackboneSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    budgets: list[PluginRef] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    targets: list[float] = Field(default_factory=lambda: [0.15, 0.20, 0.25, 0.30, 0.50], min_length=1)
    batch_size: PositiveInt = 256
    train_batch_size: PositiveInt = 128
    outputs: Outputs = Field(default_factory=Outputs)

    @field_validator("targets")
    @classmethod
    def _positive_targets(cls, value: list[float]) -> list[float]:
        if any(t <= 0 for t in value):
            raise ValueError("every cost target must be > 0 (a fraction of the plain backbone's cost)")
        return sorted(value)


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    backbone: BackboneSpec
    method: MethodSpec
    budget: PluginRef
    seed: int
    batch_size: int
    train_batch_size: int

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.model_dump(exclude={"label"}),
            "backbone": self.backbone.model_dump(exclude={"label"}),
            "method": self.method.model_dump(exclude={"label"}),
            "budget": self.budget.model_dump(exclude={"label"}),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "train_batch_size": self.train_batch_size,
        }

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.config(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def cell_id(self) -> str:
        parts = [self.dataset.name, self.backbone.name, self.method.display, self.budget.display,
                 f"s{self.seed}", self.config_hash[:8]]
        return "-".join(p.replace(":", "_").replace("/", "_").replace(" ", "_") for p in parts)


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; every problem is one line naming file and key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise EebenchError("no such suite file; expected a YAML file", where=where)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "(parse)"
        raise EebenchError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where, key=line) from exc
    if not isinstance(raw, dict):
        raise EebenchError("expected a mapping with keys name, datasets, backbones, methods, budgets",
                           where=where, key="(top level)")
    try:
        return Suite.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        detail = first["msg"]
        if first["type"] == "extra_forbidden":
            detail = "unknown key"
        elif first["type"] == "missing":
            detail = "required key is missing"
        raise EebenchError(f"{detail} (input: {first.get('input')!r:.60})", where=where,
                           key=_key(first["loc"])) from exc


def _check_params(factory: Callable, params: dict[str, Any], skip: int, where: str, key: str) -> None:
    """Unknown parameters are caught before any work starts."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind_partial(*([None] * skip), **params)
    except TypeError as exc:
        names = [p for p in signature.parameters if p not in ("self",)][skip:]
        raise EebenchError(f"{exc}; expected parameters among: {', '.join(names) or 'none'}",
                           where=where, key=key) from exc


def check_plugins(suite: Suite, registry: Registry, where: str) -> None:
    """Every named plugin exists and accepts the given params."""
    for i, spec in enumerate(suite.datasets):
        _check_params(registry.get("datasets", spec.name, where=where, key=f"datasets[{i}].name"),
                      spec.params, 0, where, f"datasets[{i}].params")
    for i, spec in enumerate(suite.backbones):
        factory = registry.get("backbones", spec.name, where=where, key=f"backbones[{i}].name")
        if ":" not in spec.name:
            _check_params(factory, spec.params, 2, where, f"backbones[{i}].params")
    for i, spec in enumerate(suite.methods):
        factory = registry.get("exit_strategies", spec.name, where=where, key=f"methods[{i}].name")
        _check_params(factory, spec.params, 2, where, f"methods[{i}].params")
        if spec.calibrator is not None:
            cal = registry.get("calibrators", spec.calibrator.name, where=where, key=f"methods[{i}].calibrator.name")
            _check_params(cal, spec.calibrator.params, 0, where, f"methods[{i}].calibrator.params")
        else:
            default = getattr(factory, "default_calibrator", None)
            if default:
                registry.get("calibrators", default, where=where, key=f"methods[{i}] (default calibrator)")
    for i, spec in enumerate(suite.budgets):
        factory = registry.get("budgets", spec.name, where=where, key=f"budgets[{i}].name")
        _check_params(factory, spec.params, 0, where, f"budgets[{i}].params")
        # budgets are cheap to build: bad values (epochs: 0) fail here, before any training
        build_plugin(factory, where, f"budgets[{i}].params", params=spec.params)
    labels = [m.display for m in suite.methods]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise EebenchError(f"method '{duplicates[0]}' appears twice; expected a distinct label for each",
                           where=where, key="methods")


def expand(suite: Suite) -> list[Cell]:
    return [
        Cell(d, b, m, g, s, suite.batch_size, suite.train_batch_size)
        for d, b, m, g, s in itertools.product(
            suite.datasets, suite.backbones, suite.methods, suite.budgets, suite.seeds
        )
    ]
