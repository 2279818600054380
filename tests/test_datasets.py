"""Built-in dataset plugins: real loading from the Debian copy and from copies made here."""

from __future__ import annotations

import gzip
import pickle
import struct
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from eebench.datasets import DatasetBundle, TensorImageDataset
from eebench.errors import EebenchError
from eebench.lazy import resolve
from eebench_plugins import datasets as ds
from eebench_plugins.manifests import datasets as manifest

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


# ------------------------------------------------------------------------------------------
# helpers that write the published on-disk formats


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> Path:
    """An IDX file (gzip when the name ends in .gz) holding a uint8 array."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic if magic is not None else 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return path


def write_mnist_like(directory: Path, *, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    """A tiny MNIST-format copy: image i is filled with value i, label i % 10."""
    suffix = ".gz" if gz else ""
    for split, count in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(count)])
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", np.arange(count) % 10)


def write_cifar10(base: Path, *, per_batch: int = 2, n_test: int = 3) -> Path:
    """torchvision's cifar-10-batches-py layout with a few images; label == first pixel % 10."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, count: int) -> None:
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(row[0]) % 10 for row in data]
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, handle)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, handle)
    return folder


def load_cifar_pixels(folder: Path, name: str) -> tuple[np.ndarray, list[int]]:
    with open(folder / name, "rb") as handle:
        entry = pickle.load(handle)
    return entry["data"], entry["labels"]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real data anywhere: empty EEBENCH_DATA, Debian and cache paths inside tmp_path."""
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("EEBENCH_DATA", str(env))
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setattr(ds, "DEFAULT_DATA_DIR", tmp_path / "cache")
    return env


# ------------------------------------------------------------------------------------------
# registration


def test_registers_every_builtin_dataset() -> None:
    registered: dict[str, object] = {}
    manifest.register_datasets(register=lambda name, factory: registered.__setitem__(name, factory))
    assert set(registered) == {
        "fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn", "image-folder",
    }
    assert resolve(registered["fashion-mnist"]) is ds.fashion_mnist  # registered lazily


def test_module_is_the_datasets_entry_point() -> None:
    points = {ep.name: ep.value for ep in metadata.entry_points(group="eebench")}
    assert points.get("datasets") == "eebench_plugins.manifests.datasets"  # the light manifest of this module


# ------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package


@pytest.fixture(scope="module")
def fashion() -> DatasetBundle:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EEBENCH_DATA", raising=False)
        return ds.fashion_mnist()


@needs_debian
def test_fashion_mnist_loads_from_debian_path(fashion: DatasetBundle) -> None:
    assert isinstance(fashion.train, TensorImageDataset)
    assert len(fashion.train) == 60000 and len(fashion.test) == 10000
    assert fashion.input_shape == (1, 28, 28) and fashion.num_classes == 10
    assert fashion.class_names[0] == "T-shirt/top" and len(fashion.class_names) == 10
    assert fashion.extra["source"] == str(DEBIAN)
    assert fashion.train.labels.bincount().tolist() == [6000] * 10
    assert fashion.test.labels.bincount().tolist() == [1000] * 10
    image, label = fashion.train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and isinstance(label, int)
    assert abs(fashion.train.images.mean().item()) < 0.05
    assert abs(fashion.train.images.std().item() - 1.0) < 0.05


@needs_debian
def test_fashion_augment_changes_images_and_keeps_shape(fashion: DatasetBundle) -> None:
    batch = fashion.train.images[:16]
    out = fashion.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    assert not torch.equal(out, batch)
    assert torch.equal(fashion.train.images[:16], batch), "augment must not modify the dataset"


# ------------------------------------------------------------------------------------------
# the IDX reader and the search order


def test_idx_reader_round_trips_and_rejects_bad_magic(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(ds.read_idx(write_idx(tmp_path / "ok.gz", images)), images)
    assert np.array_equal(ds.read_idx(write_idx(tmp_path / "ok-raw", images)), images)

    for magic in (0x12345678, 0x00000F03, 0x00010803):  # junk, unknown type byte, non-zero prefix
        bad = write_idx(tmp_path / "bad.gz", images, magic=magic)
        with pytest.raises(EebenchError, match=f"bad magic number 0x{magic:08x}"):
            ds.read_idx(bad)
    with pytest.raises(EebenchError, match="expected 1-d"):
        ds.read_idx(tmp_path / "ok.gz", ndim=1)


def test_idx_reader_rejects_truncated_and_non_gzip_files(tmp_path: Path) -> None:
    whole = write_idx(tmp_path / "whole", np.zeros((4, 5, 5), dtype=np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(whole[:-3])
    with pytest.raises(EebenchError, match="needs 100"):
        ds.read_idx(tmp_path / "short")
    (tmp_path / "plain.gz").write_bytes(whole)
    with pytest.raises(EebenchError, match="cannot read IDX file"):
        ds.read_idx(tmp_path / "plain.gz")


def test_eebench_data_is_preferred_over_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "fashion-mnist", n_train=20, n_test=10)
    monkeypatch.setenv("EEBENCH_DATA", str(tmp_path))
    bundle = ds.fashion_mnist()
    assert bundle.extra["source"] == str(tmp_path / "fashion-mnist")
    assert len(bundle.train) == 20 and len(bundle.test) == 10
    assert bundle.train.labels.tolist() == [i % 10 for i in range(20)]
    # image i is filled with value i: check the normalisation arithmetic exactly
    expected = (torch.arange(20, dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert torch.allclose(bundle.train.images[:, 0, 0, 0], expected, atol=1e-6)


def test_eebench_data_itself_and_root_are_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "env", n_train=20, n_test=10)
    monkeypatch.setenv("EEBENCH_DATA", str(tmp_path / "env"))
    assert len(ds.fashion_mnist().train) == 20
    write_mnist_like(tmp_path / "mine", n_train=30, n_test=10)
    assert len(ds.fashion_mnist(root=str(tmp_path / "mine")).train) == 30, "root comes first"


def test_missing_fashion_mnist_names_every_searched_directory(isolated: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EebenchError) as info:
        ds.fashion_mnist(root=str(empty))
    message = str(info.value)
    # the key is relative to the dataset's params; the core prefixes datasets[i].params
    assert "\n" not in message and message.startswith("root: Fashion-MNIST not found in ")
    for searched in (empty, isolated / "fashion-mnist", isolated, tmp_path / "debian"):
        assert f"{searched}," in message or f"{searched};" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message


def test_download_goes_through_torchvision(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        """Stands in for the network: writes what torchvision would into <root>/FashionMNIST/raw."""

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_mnist_like(Path(root) / "FashionMNIST" / "raw", n_train=12, n_test=4)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(EebenchError, match="not found"):
        ds.fashion_mnist()
    assert calls == [], "nothing is downloaded unless download is true"
    bundle = ds.fashion_mnist(download=True)
    assert calls == [(str(isolated), True)]
    assert len(bundle.train) == 12 and len(bundle.test) == 4
    assert len(ds.fashion_mnist().train) == 12, "a downloaded copy is found again offline"


def test_download_failure_is_one_line_error(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets

    def unreachable(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", unreachable)
    with pytest.raises(EebenchError, match=r"downloading MNIST into .* failed") as info:
        ds.mnist(download=True)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# MNIST / KMNIST and augmentation without flips


def test_mnist_and_kmnist_read_torchvision_layout(isolated: Path, tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "tv" / "MNIST" / "raw", n_train=20, n_test=10, gz=False)
    bundle = ds.mnist(root=str(tmp_path / "tv"))
    assert (len(bundle.train), len(bundle.test), bundle.input_shape) == (20, 10, (1, 28, 28))
    assert bundle.class_names == [str(d) for d in range(10)]

    write_mnist_like(isolated / "kmnist", n_train=10, n_test=10)
    kmnist = ds.kmnist()
    assert kmnist.name == "kmnist" and len(kmnist.train) == 10 and kmnist.class_names[1] == "ki"
    with pytest.raises(EebenchError, match="MNIST not found"):
        ds.mnist()


def _half_bright(batch: int = 64, size: int = 28) -> torch.Tensor:
    """Left half 1, right half 0: a horizontal flip is visible as a bright right half."""
    images = torch.zeros(batch, 1, size, size)
    images[..., : size // 2] = 1.0
    return images


def test_mnist_like_augment_crops_but_never_flips(isolated: Path) -> None:
    for name in ("mnist", "kmnist", "fashion-mnist"):
        write_mnist_like(isolated / name)
    images = _half_bright()
    generator = torch.Generator().manual_seed(0)
    for factory in (ds.mnist, ds.kmnist):
        out = factory().augment(images, generator)
        assert out.shape == images.shape
        assert not torch.equal(out, images), "random crops move the image"
        assert out[..., 16:].max() == 0, "a flip would light up the right half"

    flipped = ds.fashion_mnist().augment(images, generator)
    assert flipped[..., 16:].amax(dim=(1, 2, 3)).gt(0).any(), "fashion-mnist flips some images"


# ------------------------------------------------------------------------------------------
# CIFAR and SVHN from local copies in torchvision's format


def test_cifar10_loads_a_local_copy_without_downloading(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download a copy that is present")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    folder = write_cifar10(tmp_path / "data")
    bundle = ds.cifar10(root=str(tmp_path / "data"), download=True)
    assert isinstance(bundle.train, TensorImageDataset)
    assert (len(bundle.train), len(bundle.test)) == (10, 3)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert bundle.class_names == [f"c{i}" for i in range(10)]

    data, labels = load_cifar_pixels(folder, "data_batch_1")
    assert bundle.train.labels[:2].tolist() == labels
    raw = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(ds.CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(ds.CIFAR_STD).view(3, 1, 1)
    assert torch.allclose(bundle.train.images[0], (raw - mean) / std, atol=1e-5)

    out = bundle.augment(bundle.train.images, torch.Generator().manual_seed(1))
    assert out.shape == bundle.train.images.shape and not torch.equal(out, bundle.train.images)


def test_cifar_missing_says_where_and_how(isolated: Path, tmp_path: Path) -> None:
    with pytest.raises(EebenchError) as info:
        ds.cifar100(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message and "download: true" in message
    with pytest.raises(EebenchError, match=str(isolated / "cifar-10-batches-py")):
        ds.cifar10()


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(0)
    for name, count in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:count], dtype=np.uint8)
        scipy.io.savemat(tmp_path / name, {"X": x, "y": y})
    bundle = ds.svhn(root=str(tmp_path))
    assert bundle.train.labels.tolist() == [0, 1, 2, 3, 4]
    assert bundle.train.images.shape == (5, 3, 32, 32) and len(bundle.test) == 3
    mat = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert torch.isclose(
        bundle.train.images[0, 2, 5, 7],
        torch.tensor((mat["X"][5, 7, 2, 0] / 255 - ds.SVHN_MEAN[2]) / ds.SVHN_STD[2], dtype=torch.float32),
    )
    out = bundle.augment(_half_bright(8, 32), torch.Generator().manual_seed(0))
    assert out[..., 18:].max() == 0, "digits are never flipped"


# ------------------------------------------------------------------------------------------
# image-folder


CLASS_COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def make_image_folder(base: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """2 classes x 3 PNGs per split, each class one solid colour, sizes varying."""
    from PIL import Image

    for split in splits:
        for name, colour in CLASS_COLOURS.items():
            (base / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20 + 4 * i, 16 + 2 * i), colour).save(base / split / name / f"{i}.png")
    return base


def test_image_folder_loads_shapes_labels_and_names(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    bundle = ds.image_folder(root=str(root), image_size=12)
    assert isinstance(bundle.train, TensorImageDataset) and bundle.extra["in_memory"] is True
    assert bundle.train.images.shape == (6, 3, 12, 12) and len(bundle.test) == 6
    assert bundle.input_shape == (3, 12, 12) and bundle.num_classes == 2
    assert bundle.class_names == ["cat", "dog"]
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # solid red cats: the red channel is (1 - mean) / std everywhere, blue is (0 - mean) / std
    red = (1 - ds.IMAGENET_MEAN[0]) / ds.IMAGENET_STD[0]
    assert torch.allclose(bundle.train.images[0, 0], torch.full((12, 12), red), atol=1e-5)
    assert torch.allclose(bundle.test.images[3, 0], torch.full((12, 12), -ds.IMAGENET_MEAN[0] / 0.229), atol=1e-5)


def test_image_folder_lazy_matches_in_memory_and_accepts_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", splits=("train", "val"))
    lazy = ds.image_folder(root=str(root), image_size=8, in_memory=False, mean=0.5, std=0.5)
    held = ds.image_folder(
        train_dir=str(root / "train"), test_dir=str(root / "val"), image_size=8, mean=0.5, std=0.5
    )
    assert not isinstance(lazy.train, TensorImageDataset) and lazy.extra["in_memory"] is False
    assert lazy.extra["test_dir"] == str(root / "val")
    image, label = lazy.test[4]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.allclose(image, held.test.images[4]) and label == int(held.test.labels[4])
    too_big = ds.image_folder(root=str(root), image_size=8, max_memory_mb=0)
    assert too_big.extra["in_memory"] is False


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", splits=("train",))
    with pytest.raises(EebenchError, match=str(root / "test")):
        ds.image_folder(root=str(root), image_size=8)
    with pytest.raises(EebenchError, match=str(tmp_path / "missing")):
        ds.image_folder(train_dir=str(tmp_path / "missing"), test_dir=str(root / "train"))
    (root / "test" / "cat").mkdir(parents=True)
    with pytest.raises(EebenchError, match=f"{root / 'test'}: Found no valid file"):
        ds.image_folder(root=str(root), image_size=8)
    (root / "train" / "cat" / "0.png").rename(root / "test" / "cat" / "0.png")
    with pytest.raises(EebenchError, match=r"class folders differ: .* has \['cat', 'dog'\], .* has \['cat'\]"):
        ds.image_folder(root=str(root), image_size=8)
    with pytest.raises(EebenchError, match="image_size"):
        ds.image_folder(root=str(root), image_size=0)

    (root / "test" / "dog").mkdir()
    (root / "test" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EebenchError, match="cannot decode .*broken.png"):
        ds.image_folder(root=str(root), image_size=8)
