"""The public API: everything a plugin (built-in or third-party) may use.

Plugins import from here and from ``eebench.hookimpl``; nothing else in the core is
promised to stay stable. Each plugin kind is a factory registered under a name:

* Dataset:      ``factory(**params) -> DatasetBundle``
* Backbone:     ``factory(num_classes, input_shape, **params) -> StagedBackbone``
* ExitStrategy: ``factory(backbone, context, **params) -> ExitStrategy``
* Calibrator:   ``factory(**params) -> Calibrator``
* Budget:       ``factory(**params) -> Budget``

A factory may declare its parameters as a pydantic model deriving from :class:`Params`: a
class attribute ``Params = MyParams`` on the class, or ``@params_model(MyParams)`` on a function.
``eebench validate`` and ``eebench run`` then check a suite's ``params`` against it, and the
plugin is built from the validated values (see ``eebench.params``).

A register hook should register ``lazy("module:Name", params=MyParams, ...)`` (``eebench.lazy``)
rather than the class itself, from a module that imports neither torch nor this one (import
``lazy`` and ``Params`` from ``eebench.lazy`` and ``eebench.params`` there): every command loads
every plugin's hooks, and ``lazy`` imports the implementation only when it is used.
"""

from __future__ import annotations

from eebench.activations import ActivationCache, Activations, FrozenBatch, Reducer
from eebench.budget import BatchStream, Budget, Charge, Spend, TrainingBudget
from eebench.calibration import Calibrator, upper_hull
from eebench.costs import (
    MAC_EQUIVALENTS,
    ExitCosts,
    StageCosts,
    adaptive_pool_macs,
    comparison_macs,
    count_macs,
    elementwise_macs,
    entropy_macs,
    multiply_add_macs,
    pool_macs,
    reduction_macs,
    softmax_macs,
    sort_macs,
    squared_distance_macs,
)
from eebench.datasets import DatasetBundle, TensorImageDataset, random_crop_flip, take
from eebench.errors import EebenchError, check_finite_loss
from eebench.lazy import LazyFactory, lazy
from eebench.model import StagedBackbone, stage_taps
from eebench.params import Params, params_model
from eebench.passes import iterate_batches
from eebench.progress import progress
from eebench.strategy import (
    ExitOutputs,
    ExitState,
    ExitStrategy,
    MethodContext,
    MethodReport,
    OperatingPoint,
    StepOutput,
    exit_costs_at,
    exit_fires,
    seeded_modules,
)
from eebench.trace import ExitTrace

__all__ = [
    "MAC_EQUIVALENTS",
    "ActivationCache",
    "Activations",
    "FrozenBatch",
    "Reducer",
    "BatchStream",
    "Budget",
    "Charge",
    "Calibrator",
    "DatasetBundle",
    "EebenchError",
    "ExitCosts",
    "ExitOutputs",
    "ExitState",
    "ExitStrategy",
    "ExitTrace",
    "LazyFactory",
    "MethodContext",
    "MethodReport",
    "OperatingPoint",
    "Params",
    "Spend",
    "StageCosts",
    "StagedBackbone",
    "StepOutput",
    "TensorImageDataset",
    "TrainingBudget",
    "adaptive_pool_macs",
    "check_finite_loss",
    "comparison_macs",
    "count_macs",
    "elementwise_macs",
    "entropy_macs",
    "exit_costs_at",
    "exit_fires",
    "iterate_batches",
    "lazy",
    "multiply_add_macs",
    "params_model",
    "pool_macs",
    "progress",
    "random_crop_flip",
    "reduction_macs",
    "softmax_macs",
    "seeded_modules",
    "sort_macs",
    "squared_distance_macs",
    "stage_taps",
    "take",
    "upper_hull",
]
