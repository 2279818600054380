"""Declared parameters of the built-in datasets (``eebench_plugins.datasets``).

The harness calls a dataset factory with the suite's own values, so these schemas are strict
(a string is not a number, ``1`` is not ``true``): what ``validate`` accepts is what the
loaders accept.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, StrictInt, StrictStr, field_validator

from eebench.params import Params  # not eebench.api (torch): the datasets manifest imports this module


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_number)]


class FileDatasetParams(Params):
    """``root``: where to look first (else the usual places, then ``EEBENCH_DATA``); ``download``:
    fetch the files with torchvision when they are nowhere."""

    root: StrictStr | None = None
    download: StrictBool = False


class SVHNParams(FileDatasetParams):
    extra: StrictBool = False  # add the 531k "extra" images to the training split


def _stats(name: str, value: Any) -> Any:
    if value is None:
        return value
    values = [value] if not isinstance(value, list) else value
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values) or len(values) not in (1, 3) or (
            name == "std" and min(values) <= 0):
        raise ValueError(f"{name} must be one number or three numbers{' > 0' if name == 'std' else ''}, got {value!r}")
    return value


class ImageFolderParams(Params):
    root: StrictStr | None = None
    train_dir: StrictStr | None = None
    test_dir: StrictStr | None = None
    image_size: StrictInt = Field(224, ge=1, le=16384)
    crop_ratio: Number = Field(0.875, gt=0, le=1)
    mean: Any = None
    std: Any = None
    in_memory: StrictBool = True
    max_memory_mb: Number = Field(4096, ge=0)
    flip: StrictBool = True
    padding: StrictInt | None = Field(None, ge=0, le=16384)
    download: StrictBool = False

    @field_validator("mean")
    @classmethod
    def _mean(cls, value: Any) -> Any:
        return _stats("mean", value)

    @field_validator("std")
    @classmethod
    def _std(cls, value: Any) -> Any:
        return _stats("std", value)

    @field_validator("download")
    @classmethod
    def _download(cls, value: bool) -> bool:
        if value:
            raise ValueError("image-folder cannot download; expected download: false and root or train_dir/test_dir "
                             "pointing at local images")
        return value
