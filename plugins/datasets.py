"""Built-in datasets: fashion-mnist, mnist, kmnist, cifar10, cifar100, svhn and image-folder.

Every factory returns an un-augmented, normalised, in-memory ``TensorImageDataset`` pair where
the data fits (the fast path on a CPU) plus a batch-level ``augment`` used only in training.

Local copies are read by small readers of the published on-disk formats (IDX, the CIFAR
pickles, the SVHN ``.mat`` files) so that a copy made by hand, by a distribution package or by
an earlier torchvision download all load the same way and without checksum passes;
torchvision is used to download (``download: true``) and for ``ImageFolder``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from eebench.api import DatasetBundle, EebenchError, TensorImageDataset, params_model, random_crop_flip
from eebench_plugins.dataset_params import FileDatasetParams, ImageFolderParams, SVHNParams

try:  # numpy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

#: The key (relative to the dataset's params; the core prefixes ``datasets[i].params``) of a
#: problem with the files a dataset reads: ``root`` chooses where they are.
KEY = "root"

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files; a module-level
#: constant so tests (and unusual installs) can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Download / cache directory used when neither ``root`` nor ``$EEBENCH_DATA`` is set.
DEFAULT_DATA_DIR = Path("~/.cache/eebench/data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type byte -> numpy dtype (big-endian where multi-byte), from the IDX format description.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------------------------
# shared helpers


def _data_dir_env() -> Path | None:
    """``$EEBENCH_DATA`` as a path, or None when unset or empty."""
    value = os.environ.get("EEBENCH_DATA", "").strip()
    return Path(value).expanduser() if value else None


def _download_root(root: str | os.PathLike | None) -> Path:
    """Where torchvision downloads land: ``root``, else ``$EEBENCH_DATA``, else the cache dir."""
    if root:
        return Path(root).expanduser()
    return _data_dir_env() or DEFAULT_DATA_DIR.expanduser()


def _unique(paths: Sequence[Path]) -> list[Path]:
    """Paths in order without repeats, so an error message lists each place once."""
    seen: list[Path] = []
    for path in paths:
        if path not in seen:
            seen.append(path)
    return seen


def _listing(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 normalised per channel, in place to halve peak memory."""
    out = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    shape = (1, -1, 1, 1)
    out.div_(255.0)
    out.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
    out.div_(torch.tensor(std, dtype=torch.float32).view(shape))
    return out


def _tensor_dataset(
    images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> TensorImageDataset:
    return TensorImageDataset(_normalise(images, mean, std), torch.from_numpy(labels.astype(np.int64)))


def _check_labels(title: str, split: str, labels: np.ndarray, count: int, num_classes: int) -> None:
    """Reject a copy whose labels do not match its images: a corrupt file, not a silent bug."""
    if labels.shape[0] != count:
        raise EebenchError(
            f"{title} {split} split has {count} images but {labels.shape[0]} labels", key=KEY
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise EebenchError(
            f"{title} {split} labels must lie in 0..{num_classes - 1}, "
            f"found {int(labels.min())}..{int(labels.max())}",
            key=KEY,
        )


def _torchvision_download(title: str, target: Path, fetch: Callable[[], object]) -> None:
    """Run a torchvision download, turning network and integrity failures into one line."""
    try:
        fetch()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EebenchError(
            f"downloading {title} into {target} failed ({reason}); check the network or place a "
            f"copy there by hand",
            key="download",
        ) from exc


# --------------------------------------------------------------------------------------------
# IDX (MNIST-family) reader


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) into a numpy array.

    The magic number (two zero bytes, a type byte, a dimension count) and the payload length
    are checked, so a wrong or truncated file fails loudly rather than yielding garbage.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = bytearray(handle.read())
    except (OSError, EOFError) as exc:
        raise EebenchError(f"cannot read IDX file {path}: {exc}", key=KEY) from exc
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic is None or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        shown = "missing" if magic is None else f"0x{magic:08x}"
        raise EebenchError(
            f"{path} is not an IDX file: bad magic number {shown}; expected 0x000008NN", key=KEY
        )
    dims_count = data[3]
    if ndim is not None and dims_count != ndim:
        raise EebenchError(
            f"{path} holds a {dims_count}-d IDX array (magic 0x{magic:08x}); expected {ndim}-d", key=KEY
        )
    header = 4 + 4 * dims_count
    if len(data) < header:
        raise EebenchError(f"{path} is truncated inside its IDX header", key=KEY)
    dims = struct.unpack(f">{dims_count}I", bytes(data[4:header]))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)  # exact: numpy's int64 product wraps for a crafted header
    if len(data) - header != count * dtype.itemsize:
        raise EebenchError(
            f"{path} has {len(data) - header} bytes of data; its IDX header {dims} needs "
            f"{count * dtype.itemsize}",
            key=KEY,
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _idx_file(directory: Path, stem: str) -> Path | None:
    """The gzip or the plain variant of one IDX file in ``directory``, if present."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_dir(candidates: Sequence[Path]) -> Path | None:
    """The first candidate directory that holds all four IDX files of an MNIST-style set."""
    for directory in candidates:
        if all(_idx_file(directory, stem) for stem in IDX_FILES.values()):
            return directory
    return None


def load_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, H, W] uint8 and labels [N] of the ``train`` or ``test`` split."""
    images = read_idx(_idx_file(directory, IDX_FILES[f"{split}_images"]), ndim=3)
    labels = read_idx(_idx_file(directory, IDX_FILES[f"{split}_labels"]), ndim=1)
    return images[:, None, :, :], labels


@dataclass(frozen=True)
class _MnistLike:
    """What differs between the IDX datasets: names, statistics, classes, augmentation."""

    name: str
    title: str
    torchvision_class: str
    mean: float
    std: float
    class_names: tuple[str, ...]
    flip: bool
    hint: str


def _mnist_candidates(spec: _MnistLike, root: str | os.PathLike | None) -> list[Path]:
    """Where an IDX copy may live, in priority order (plain dirs and torchvision's layout)."""
    raw = Path(spec.torchvision_class) / "raw"
    paths: list[Path] = []
    if root:
        base = Path(root).expanduser()
        paths += [base, base / raw]
    env = _data_dir_env()
    if env is not None:
        paths += [env / spec.name, env / spec.name / raw]
        # $EEBENCH_DATA itself only for Fashion-MNIST: MNIST and KMNIST use the same file names,
        # so a bare directory is only trusted for the default dataset.
        paths += [env, env / raw] if spec.name == "fashion-mnist" else [env / raw]
    if spec.name == "fashion-mnist":
        paths.append(DEBIAN_FASHION_MNIST_DIR)
    paths.append(_download_root(root) / raw)
    return _unique(paths)


def _load_mnist_like(spec: _MnistLike, root: str | os.PathLike | None, download: bool) -> DatasetBundle:
    candidates = _mnist_candidates(spec, root)
    directory = find_idx_dir(candidates)
    if directory is None and download:
        target = _download_root(root)
        _download_mnist_like(spec, target)
        directory = find_idx_dir([target / spec.torchvision_class / "raw"])
    if directory is None:
        raise EebenchError(f"{spec.title} not found in {_listing(candidates)}; {spec.hint}", key=KEY)
    splits = {}
    for split in ("train", "test"):
        images, labels = load_idx_split(directory, split)
        _check_labels(spec.title, split, labels, images.shape[0], len(spec.class_names))
        splits[split] = _tensor_dataset(images, labels, (spec.mean,), (spec.std,))
    height, width = splits["train"].images.shape[-2:]
    return DatasetBundle(
        name=spec.name,
        train=splits["train"],
        test=splits["test"],
        num_classes=len(spec.class_names),
        input_shape=(1, int(height), int(width)),
        augment=functools.partial(random_crop_flip, padding=2, flip=spec.flip),
        class_names=list(spec.class_names),
        extra={"source": str(directory), "mean": [spec.mean], "std": [spec.std]},
    )


def _download_mnist_like(spec: _MnistLike, target: Path) -> None:
    """torchvision fetches every split's raw IDX files into ``<target>/<Class>/raw``."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    _torchvision_download(spec.title, target, lambda: cls(str(target), train=True, download=True))


_DOWNLOAD_HINT = "set root or EEBENCH_DATA to a directory holding the IDX .gz files, or set download: true"

FASHION_MNIST = _MnistLike(
    name="fashion-mnist",
    title="Fashion-MNIST",
    torchvision_class="FashionMNIST",
    mean=0.2860,
    std=0.3530,
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    flip=True,
    hint="install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    "set EEBENCH_DATA, or set download: true",
)
MNIST = _MnistLike(
    name="mnist",
    title="MNIST",
    torchvision_class="MNIST",
    mean=0.1307,
    std=0.3081,
    class_names=tuple(str(digit) for digit in range(10)),
    flip=False,
    hint=_DOWNLOAD_HINT,
)
KMNIST = _MnistLike(
    name="kmnist",
    title="KMNIST",
    torchvision_class="KMNIST",
    mean=0.1918,
    std=0.3483,
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    flip=False,
    hint=_DOWNLOAD_HINT,
)


@params_model(FileDatasetParams)
def fashion_mnist(*, root: str | None = None, download: bool = False) -> DatasetBundle:
    """Fashion-MNIST (60k/10k 28x28 grey): the default dataset, found offline via Debian."""
    return _load_mnist_like(FASHION_MNIST, root, download)


@params_model(FileDatasetParams)
def mnist(*, root: str | None = None, download: bool = False) -> DatasetBundle:
    """MNIST digits; no flips, since a mirrored digit is a different (or no) digit."""
    return _load_mnist_like(MNIST, root, download)


@params_model(FileDatasetParams)
def kmnist(*, root: str | None = None, download: bool = False) -> DatasetBundle:
    """Kuzushiji-MNIST (cursive Japanese); no flips, as for any script."""
    return _load_mnist_like(KMNIST, root, download)


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle batches, as torchvision downloads and extracts them)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


@dataclass(frozen=True)
class _CifarLike:
    """File names and keys of one CIFAR variant in its ``*-python`` pickle layout."""

    name: str
    title: str
    torchvision_class: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = _CifarLike(
    name="cifar10",
    title="CIFAR-10",
    torchvision_class="CIFAR10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
)
CIFAR100 = _CifarLike(
    name="cifar100",
    title="CIFAR-100",
    torchvision_class="CIFAR100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, for latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}); "
                                     "only latin-1 text encodes bytes")
    return text.encode("latin1")


#: Every global a CIFAR ``*-python`` batch may name: numpy's array (and scalar) reconstruction
#: under its numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module names, and the
#: latin-1 ``_codecs.encode`` Python 3 writes bytes with at protocol 2. The original files are
#: Python 2 protocol-2 pickles of a dict of str/bytes keys, lists of ints and bytes, and one
#: uint8 ndarray; nothing else is needed, and a global outside this table is never imported.
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only the data a CIFAR batch holds: builtin containers, str/bytes, numbers and
    numpy arrays. Any other global (``os.system``, ``builtins.eval``, a class with a
    ``__reduce__``) is refused before it is imported, so a crafted file runs nothing."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def _unpickle(path: Path) -> dict:
    """A CIFAR batch read by :class:`_CifarUnpickler` (data only, no code); latin1 decodes the
    original Python 2 pickles, keys normalised to str."""
    try:
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except OSError as exc:
        raise EebenchError(f"cannot read CIFAR batch {path}: {exc.strerror or exc}", key=KEY) from exc
    except Exception as exc:  # a refused global, or any damage a pickle stream can carry
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EebenchError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {reason}; expected a CIFAR "
                           "python batch (a pickled dict of lists and numpy arrays, nothing else)",
                           key=KEY) from exc
    if not isinstance(entry, dict):
        raise EebenchError(f"{path} is not a CIFAR batch (expected a pickled dict)", key=KEY)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_files(spec: _CifarLike, directory: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file_name in files:
        entry = _unpickle(directory / file_name)
        if "data" not in entry or spec.label_key not in entry:
            raise EebenchError(
                f"{directory / file_name} lacks the 'data' or '{spec.label_key}' entry of a "
                f"{spec.title} batch",
                key=KEY,
            )
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[spec.label_key], dtype=np.int64).reshape(-1))
        except (TypeError, ValueError, OverflowError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EebenchError(
                f"{directory / file_name}: {reason}; expected 'data' as N x 3072 uint8 pixels and "
                f"'{spec.label_key}' as N integers",
                key=KEY,
            ) from exc
    return np.concatenate(images), np.concatenate(labels)


def _cifar_class_names(spec: _CifarLike, directory: Path) -> list[str]:
    meta_path = directory / spec.meta_file
    if meta_path.is_file():
        names = _unpickle(meta_path).get(spec.names_key)
        if isinstance(names, (list, tuple)) and len(names) == spec.num_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if spec.num_classes == 10:
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(spec.num_classes)]


def _dataset_root_candidates(name: str, root: str | os.PathLike | None) -> list[Path]:
    """``root`` alone when given; otherwise ``$EEBENCH_DATA`` (and its ``<name>/``) or the cache."""
    if root:
        return [Path(root).expanduser()]
    env = _data_dir_env()
    if env is not None:
        return [env, env / name]
    return [DEFAULT_DATA_DIR.expanduser()]


def _load_cifar(spec: _CifarLike, root: str | os.PathLike | None, download: bool) -> DatasetBundle:
    needed = [*spec.train_files, *spec.test_files]
    candidates = [base / spec.folder for base in _dataset_root_candidates(spec.name, root)]
    directory = next((d for d in candidates if all((d / f).is_file() for f in needed)), None)
    if directory is None and download:
        target = _download_root(root)
        _download_cifar(spec, target)
        directory = target / spec.folder
    if directory is None:
        raise EebenchError(
            f"{spec.title} not found in {_listing(candidates)} (expected {', '.join(needed)}); "
            f"set download: true to fetch it with torchvision, or set root to a directory holding "
            f"{spec.folder}/",
            key=KEY,
        )
    train_x, train_y = _read_cifar_files(spec, directory, spec.train_files)
    test_x, test_y = _read_cifar_files(spec, directory, spec.test_files)
    _check_labels(spec.title, "train", train_y, train_x.shape[0], spec.num_classes)
    _check_labels(spec.title, "test", test_y, test_x.shape[0], spec.num_classes)
    return DatasetBundle(
        name=spec.name,
        train=_tensor_dataset(train_x, train_y, spec.mean, spec.std),
        test=_tensor_dataset(test_x, test_y, spec.mean, spec.std),
        num_classes=spec.num_classes,
        input_shape=(3, 32, 32),
        augment=functools.partial(random_crop_flip, padding=4, flip=True),
        class_names=_cifar_class_names(spec, directory),
        extra={"source": str(directory), "mean": list(spec.mean), "std": list(spec.std)},
    )


def _download_cifar(spec: _CifarLike, target: Path) -> None:
    """torchvision downloads, verifies and extracts the archive into ``<target>/<folder>``."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    _torchvision_download(spec.title, target, lambda: cls(str(target), train=True, download=True))


@params_model(FileDatasetParams)
def cifar10(*, root: str | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-10 held in memory (50k/10k 32x32 colour)."""
    return _load_cifar(CIFAR10, root, download)


@params_model(FileDatasetParams)
def cifar100(*, root: str | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-100 with its 100 fine labels, held in memory."""
    return _load_cifar(CIFAR100, root, download)


# --------------------------------------------------------------------------------------------
# SVHN (cropped digits, MATLAB files as torchvision downloads them)

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] and labels [N] with SVHN's label 10 mapped to digit 0."""
    import scipy.io

    try:  # MATLAB v5 data only: loadmat reads arrays and structs, it never unpickles or runs code
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # OSError, ValueError, MatReadError, NotImplementedError (v7.3 / HDF5), ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EebenchError(f"cannot read SVHN file {path}: {type(exc).__name__}: {reason}; expected a MATLAB "
                           "v5 .mat file as torchvision downloads it", key=KEY) from exc
    if "X" not in mat or "y" not in mat or getattr(mat["X"], "ndim", 0) != 4 or mat["X"].shape[:3] != (32, 32, 3):
        raise EebenchError(f"{path} lacks the X [32, 32, 3, N] and y arrays of an SVHN file", key=KEY)
    try:
        images = np.transpose(mat["X"].astype(np.uint8, copy=False), (3, 2, 0, 1))
        labels = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EebenchError(f"{path}: X and y must be numeric arrays ({type(exc).__name__})", key=KEY) from exc
    labels[labels == 10] = 0
    return images, labels


@params_model(SVHNParams)
def svhn(*, root: str | None = None, download: bool = False, extra: bool = False) -> DatasetBundle:
    """SVHN cropped digits in memory; ``extra: true`` appends the 531k-image extra split to train.

    No flips: a mirrored digit is not the same digit.
    """
    splits = ["train", "test", *(["extra"] if extra else [])]
    candidates = _dataset_root_candidates("svhn", root)
    if root:
        candidates.append(Path(root).expanduser() / "svhn")
    directory = next((d for d in candidates if all((d / SVHN_FILES[s]).is_file() for s in splits)), None)
    if directory is None and download:
        directory = _download_root(root)
        _download_svhn(directory, splits)
    if directory is None:
        names = ", ".join(SVHN_FILES[s] for s in splits)
        raise EebenchError(
            f"SVHN not found in {_listing(candidates)} (expected {names}); set download: true to "
            "fetch it with torchvision, or set root to a directory holding those files",
            key=KEY,
        )
    train_x, train_y = _read_svhn(directory / SVHN_FILES["train"])
    if extra:
        extra_x, extra_y = _read_svhn(directory / SVHN_FILES["extra"])
        train_x, train_y = np.concatenate([train_x, extra_x]), np.concatenate([train_y, extra_y])
    test_x, test_y = _read_svhn(directory / SVHN_FILES["test"])
    _check_labels("SVHN", "train", train_y, train_x.shape[0], 10)
    _check_labels("SVHN", "test", test_y, test_x.shape[0], 10)
    return DatasetBundle(
        name="svhn",
        train=_tensor_dataset(train_x, train_y, SVHN_MEAN, SVHN_STD),
        test=_tensor_dataset(test_x, test_y, SVHN_MEAN, SVHN_STD),
        num_classes=10,
        input_shape=(3, 32, 32),
        augment=functools.partial(random_crop_flip, padding=2, flip=False),
        class_names=[str(digit) for digit in range(10)],
        extra={"source": str(directory), "mean": list(SVHN_MEAN), "std": list(SVHN_STD), "extra": extra},
    )


def _download_svhn(target: Path, splits: list[str]) -> None:
    import torchvision.datasets

    def fetch() -> None:
        for split in splits:
            torchvision.datasets.SVHN(str(target), split=split, download=True)

    _torchvision_download("SVHN", target, fetch)


# --------------------------------------------------------------------------------------------
# image-folder (any ImageFolder tree: <split>/<class>/<image>)


def _resolve_split_dirs(
    root: str | None, train_dir: str | None, test_dir: str | None
) -> tuple[Path, Path]:
    """Explicit ``train_dir``/``test_dir`` win; otherwise ``root``/train and ``root``/test or val."""
    if (train_dir is None or test_dir is None) and not root:
        raise EebenchError(
            "image-folder needs root (with train/ and test/ or val/ subfolders) or both "
            "train_dir and test_dir",
            key=KEY,
        )
    base = Path(root).expanduser() if root else None
    train_path = Path(train_dir).expanduser() if train_dir else base / "train"
    if not train_path.is_dir():
        raise EebenchError(f"image-folder train directory {train_path} does not exist",
                           key="train_dir" if train_dir else KEY)
    if test_dir:
        test_path = Path(test_dir).expanduser()
        if not test_path.is_dir():
            raise EebenchError(f"image-folder test directory {test_path} does not exist", key="test_dir")
        return train_path, test_path
    for split in ("test", "val"):
        if (base / split).is_dir():
            return train_path, base / split
    raise EebenchError(
        f"image-folder test directory {base / 'test'} (or {base / 'val'}) does not exist", key=KEY
    )


def _stats(name: str, values: Sequence[float] | float | None, default: tuple[float, ...]) -> tuple:
    """Per-channel mean or std, one value broadcast to three channels."""
    if values is None:
        return default
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise EebenchError(
            f"image-folder {name} must be one number or three numbers{' > 0' if name == 'std' else ''}, "
            f"got {values}",
            key=name,
        )
    return tuple(values)


#: The Pillow decoders image-folder may use: those of ImageFolder's extensions. Pillow picks
#: a decoder by a file's content, not its name, so without this list an ``x.png`` holding
#: PostScript would be handed to Ghostscript (EPS), a program run on untrusted input.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")


def _pil_loader(path: str) -> Any:
    """torchvision's ``pil_loader`` restricted to :data:`IMAGE_FORMATS`."""
    from PIL import Image

    with open(path, "rb") as handle:
        image = Image.open(handle, formats=IMAGE_FORMATS)
        return image.convert("RGB")


def _image_folder(path: Path, transform: Callable) -> Dataset:
    import torchvision.datasets

    try:
        return torchvision.datasets.ImageFolder(str(path), transform=transform, loader=_pil_loader)
    except (FileNotFoundError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or ["no images"])[0]
        raise EebenchError(f"image-folder {path}: {reason}", key=KEY) from exc


def _materialise(dataset: Any, shape: tuple[int, int, int]) -> TensorImageDataset:
    """Decode every image once into one tensor, so training never touches PIL again."""
    from PIL.Image import DecompressionBombError

    images = torch.empty((len(dataset), *shape), dtype=torch.float32)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for index in range(len(dataset)):
        try:
            image, label = dataset[index]
        except (OSError, DecompressionBombError) as exc:  # UnidentifiedImageError, truncated files, bombs
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EebenchError(f"image-folder cannot decode {dataset.samples[index][0]}: {reason}; expected a "
                               f"{'/'.join(IMAGE_FORMATS)} image", key=KEY) from exc
        images[index] = image
        labels[index] = label
    return TensorImageDataset(images, labels)


@params_model(ImageFolderParams)
def image_folder(
    *,
    root: str | None = None,
    train_dir: str | None = None,
    test_dir: str | None = None,
    image_size: int = 224,
    crop_ratio: float = 0.875,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    in_memory: bool = True,
    max_memory_mb: float = 4096,
    flip: bool = True,
    padding: int | None = None,
    download: bool = False,
) -> DatasetBundle:
    """Any ``<split>/<class>/<image>`` tree, resized and centre-cropped to ``image_size``.

    Images are resized so the short side is ``image_size / crop_ratio`` and centre-cropped
    (the usual ImageNet evaluation transform; ``crop_ratio: 1`` keeps the whole image). With
    ``in_memory`` the decoded tensors are held in RAM when they fit in ``max_memory_mb``;
    otherwise images are decoded lazily on every pass. ``download`` is accepted for uniformity
    and must stay false: there is nothing to download.
    """
    if download:
        raise EebenchError(
            "image-folder cannot download; point root or train_dir/test_dir at local images", key="download"
        )
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise EebenchError(f"image-folder image_size must be a positive integer, got {image_size!r}",
                           key="image_size")
    if not 0 < crop_ratio <= 1:
        raise EebenchError(f"image-folder crop_ratio must be in (0, 1], got {crop_ratio!r}", key="crop_ratio")
    from torchvision import transforms

    mean_t, std_t = _stats("mean", mean, IMAGENET_MEAN), _stats("std", std, IMAGENET_STD)
    train_path, test_path = _resolve_split_dirs(root, train_dir, test_dir)
    transform = transforms.Compose([
        transforms.Resize(round(image_size / crop_ratio)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean_t, std_t),
    ])
    train, test = _image_folder(train_path, transform), _image_folder(test_path, transform)
    if train.classes != test.classes:
        raise EebenchError(
            f"image-folder class folders differ: {train_path} has {train.classes}, "
            f"{test_path} has {test.classes}",
            key=KEY,
        )
    class_names = list(train.classes)
    shape = (3, image_size, image_size)
    megabytes = (len(train) + len(test)) * int(np.prod(shape)) * 4 / 2**20
    held = in_memory and megabytes <= max_memory_mb
    if held:
        train, test = _materialise(train, shape), _materialise(test, shape)
    return DatasetBundle(
        name="image-folder",
        train=train,
        test=test,
        num_classes=len(class_names),
        input_shape=shape,
        augment=functools.partial(
            random_crop_flip, padding=max(1, image_size // 8) if padding is None else padding, flip=flip
        ),
        class_names=class_names,
        extra={
            "train_dir": str(train_path),
            "test_dir": str(test_path),
            "mean": list(mean_t),
            "std": list(std_t),
            "in_memory": held,
            "megabytes": round(megabytes, 1),
        },
    )
