"""The public API: everything a plugin (built-in or third-party) may use.

Plugins import from here and from ``eebench.hookimpl``; nothing else in the core is
promised to stay stable. Each plugin kind is a factory registered under a name:

* Dataset:      ``factory(**params) -> DatasetBundle``
* Backbone:     ``factory(num_classes, input_shape, **params) -> StagedBackbone``
* ExitStrategy: ``factory(backbone, context, **params) -> ExitStrategy``
* Calibrator:   ``factory(**params) -> Calibrator``
* Budget:       ``factory(**params) -> Budget``
"""

from __future__ import annotations

from eebench.activations import ActivationCache, Activations, Reducer
from eebench.budget import Budget, Spend, TrainingBudget
from eebench.calibration import Calibrator, upper_hull
from eebench.costs import ExitCosts, StageCosts, count_macs, softmax_macs
from eebench.datasets import DatasetBundle, TensorImageDataset, random_crop_flip, take
from eebench.errors import EebenchError
from eebench.model import StagedBackbone
from eebench.passes import iterate_batches
from eebench.progress import progress
from eebench.strategy import ExitOutputs, ExitStrategy, MethodContext, OperatingPoint
from eebench.trace import ExitTrace, exit_fires

__all__ = [
    "ActivationCache",
    "Activations",
    "Reducer",
    "Budget",
    "Calibrator",
    "DatasetBundle",
    "EebenchError",
    "ExitCosts",
    "ExitOutputs",
    "ExitStrategy",
    "ExitTrace",
    "MethodContext",
    "OperatingPoint",
    "Spend",
    "StageCosts",
    "StagedBackbone",
    "TensorImageDataset",
    "TrainingBudget",
    "count_macs",
    "exit_fires",
    "iterate_batches",
    "progress",
    "random_crop_flip",
    "softmax_macs",
    "take",
    "upper_hull",
]
