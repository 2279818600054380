"""The built-in datasets' manifest (implementation: ``eebench_plugins.datasets``; parameter models:
``eebench_plugins.dataset_params``)."""

from __future__ import annotations

from collections.abc import Callable

from eebench import hookimpl
from eebench.lazy import lazy
from eebench_plugins.dataset_params import FileDatasetParams, ImageFolderParams, SVHNParams

DATASETS = {  # name -> (function in eebench_plugins.datasets, parameter model)
    "fashion-mnist": ("fashion_mnist", FileDatasetParams),
    "mnist": ("mnist", FileDatasetParams),
    "kmnist": ("kmnist", FileDatasetParams),
    "cifar10": ("cifar10", FileDatasetParams),
    "cifar100": ("cifar100", FileDatasetParams),
    "svhn": ("svhn", SVHNParams),
    "image-folder": ("image_folder", ImageFolderParams),
}


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    """Register every built-in dataset factory."""
    for name, (function, params) in DATASETS.items():
        register(name, lazy(f"eebench_plugins.datasets:{function}", params=params))
