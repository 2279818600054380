"""Data and weight loaders execute nothing: a crafted file in a directory a suite (or the torch
hub cache) points at is refused in one line and never runs code; genuine files still load."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from eebench.errors import EebenchError
from eebench_plugins import datasets as ds

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class RunsCommand:
    """Unpickling this runs ``os.system`` (the classic pickle payload)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class WritesFile:
    """Unpickling this calls ``builtins.open(path, "w")``: creates the file, no shell needed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------------
# CIFAR pickles: genuine formats load


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the original CIFAR files: protocol 2, str (here
    bytes) as BINSTRING opcodes, numpy's reconstructor under its numpy 1 name ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dumps(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batches(seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in CIFAR_FILES:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        out[name] = (data, [int(row[0]) % 10 for row in data])
    return out


def write_cifar(base: Path, dump, batches: dict[str, tuple[np.ndarray, list[int]]], *, key=str) -> Path:
    """The cifar-10-batches-py layout, every file written by ``dump(obj) -> bytes``; keys via ``key``."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        entry = {key("batch_label"): key(f"training batch {name}"), key("data"): data, key("labels"): labels,
                 key("filenames"): [key(f"img_{i}.png") for i in range(len(labels))]}
        (folder / name).write_bytes(dump(entry))
    meta = {key("label_names"): [key(f"c{i}") for i in range(10)], key("num_cases_per_batch"): 2, key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return folder


def as_bytes(text: str) -> bytes:
    return text.encode("latin1")


GENUINE = {
    "python2-cpickle": (py2_dumps, as_bytes),  # the original files' format
    "py3-protocol2-bytes-keys": (lambda o: pickle.dumps(o, protocol=2), as_bytes),  # bytes via _codecs.encode
    "py3-protocol2-str-keys": (lambda o: pickle.dumps(o, protocol=2), str),
    "py3-protocol4": (lambda o: pickle.dumps(o, protocol=4), str),
    "py3-protocol5": (lambda o: pickle.dumps(o, protocol=5), str),  # numpy arrays via _frombuffer
}


@pytest.mark.parametrize("fmt", list(GENUINE))
def test_genuine_cifar_batches_load_through_the_restricted_unpickler(tmp_path: Path, fmt: str) -> None:
    dump, key = GENUINE[fmt]
    batches = cifar_batches()
    write_cifar(tmp_path, dump, batches, key=key)
    if fmt == "python2-cpickle":
        raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw  # py2 str key
    bundle = ds.cifar10(root=str(tmp_path))
    assert (len(bundle.train), len(bundle.test)) == (10, 2)
    assert bundle.class_names == [f"c{i}" for i in range(10)]
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    raw = torch.from_numpy(expected).float() / 255
    mean, std = torch.tensor(ds.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(ds.CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(bundle.train.images, (raw - mean) / std, atol=1e-5)
    assert bundle.train.labels.tolist() == [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][1]]
    assert bundle.test.labels.tolist() == batches["test_batch"][1]


def test_numpy_scalars_and_object_free_dtypes_are_allowed(tmp_path: Path) -> None:
    """A hand-made copy may hold numpy integer labels: numpy's scalar reconstruction is data too."""
    batches = {name: (data, [np.int64(y) for y in labels]) for name, (data, labels) in cifar_batches().items()}
    write_cifar(tmp_path, lambda o: pickle.dumps(o, protocol=2), batches)
    assert len(ds.cifar10(root=str(tmp_path)).train) == 10


# ------------------------------------------------------------------------------------------
# CIFAR pickles: crafted files run nothing


@pytest.mark.parametrize("target", ["data_batch_3", "test_batch", "batches.meta"])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_crafted_cifar_batch_runs_no_code(tmp_path: Path, target: str, protocol: int) -> None:
    folder = write_cifar(tmp_path, lambda o: pickle.dumps(o, protocol=2), cifar_batches())
    marker = tmp_path / "pwned"
    payload = {"data": RunsCommand(f"touch {marker}"), "labels": [0, 1], "label_names": WritesFile(marker)}
    (folder / target).write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(EebenchError) as info:
        ds.cifar10(root=str(tmp_path))
    assert not marker.exists(), "the crafted pickle ran code"
    message = one_line(info.value)
    assert str(folder / target) in message
    assert "refused global 'posix.system'" in message or "refused global 'os.system'" in message
    assert info.value.key == "root"


@pytest.mark.parametrize(("module", "name"), [
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("subprocess", "Popen"),
    ("numpy", "load"), ("numpy.testing._private.utils", "runstring"), ("torch", "load"), ("pickle", "loads"),
    ("copyreg", "_reconstructor"), ("numpy.lib.format", "read_array"),
])
def test_every_global_outside_the_cifar_table_is_refused_before_import(tmp_path: Path, module: str,
                                                                       name: str) -> None:
    folder = write_cifar(tmp_path, lambda o: pickle.dumps(o, protocol=2), cifar_batches())
    # GLOBAL module\nname\n, then call it with ("1",): refused at find_class, nothing is imported or called
    (folder / "data_batch_1").write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R.")
    with pytest.raises(EebenchError, match=f"refused global '{module}.{name}'"):
        ds.cifar10(root=str(tmp_path))


def test_codecs_encode_is_only_the_latin1_bytes_constructor(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, lambda o: pickle.dumps(o, protocol=2), cifar_batches())
    # _codecs.encode("x", "rot13"): an allowed global with an argument it refuses
    (folder / "data_batch_1").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(EebenchError, match="only latin-1 text encodes bytes") as info:
        ds.cifar10(root=str(tmp_path))
    one_line(info.value)


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "EOFError"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)[:-40], "cannot read"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2), "3072 uint8 pixels"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, protocol=2), "N integers"),
    (b"\x80\x02}\xff.", "UnpicklingError: invalid load key"),  # an opcode that does not exist
    (b"\x80\x02h\x07.", "cannot read"),  # a memo reference to nothing
])
def test_a_damaged_cifar_batch_is_one_line_naming_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    folder = write_cifar(tmp_path, lambda o: pickle.dumps(o, protocol=2), cifar_batches())
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(EebenchError, match=expected) as info:
        ds.cifar10(root=str(tmp_path))
    assert str(folder / "data_batch_2") in one_line(info.value)


# ------------------------------------------------------------------------------------------
# SVHN .mat and IDX: damaged or crafted files are one line


def write_svhn(root: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(0)
    for name, count in (("train_32x32.mat", 4), ("test_32x32.mat", 2)):
        scipy.io.savemat(root / name, {"X": rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8),
                                       "y": np.arange(1, count + 1, dtype=np.uint8)[:, None]})


V73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM"


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "MatReadError"),
    (V73_HEADER + b"\0" * 512, "NotImplementedError: Please use HDF reader"),
    (b"not a mat file at all" * 20, "ValueError"),
])
def test_a_damaged_svhn_file_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    write_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(content)
    with pytest.raises(EebenchError, match=expected) as info:
        ds.svhn(root=str(tmp_path))
    assert str(tmp_path / "train_32x32.mat") in one_line(info.value)


def test_svhn_arrays_of_the_wrong_kind_are_one_line(tmp_path: Path) -> None:
    import scipy.io

    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((8, 8, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(EebenchError, match=r"lacks the X \[32, 32, 3, N\]") as info:
        ds.svhn(root=str(tmp_path))
    one_line(info.value)


def test_an_idx_header_whose_size_wraps_int64_is_refused(tmp_path: Path) -> None:
    """dims 2^31 x 2^31 x 4 multiply to 2^64: numpy's int64 product wraps to 0 bytes of data."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">I3I", 0x0803, 2**31, 2**31, 4))
    with pytest.raises(EebenchError, match="needs 18446744073709551616") as info:
        ds.read_idx(path, ndim=3)
    one_line(info.value)


# ------------------------------------------------------------------------------------------
# image-folder: Pillow decodes only the image formats ImageFolder lists


def test_image_folder_never_hands_a_file_to_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin, Image

    calls: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / split / "cat" / "0.png")
    # PostScript named .png: Pillow picks the decoder by content, and EPS runs Ghostscript
    (tmp_path / "train" / "cat" / "1.png").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n")
    with pytest.raises(EebenchError, match="cannot identify image file") as info:
        ds.image_folder(root=str(tmp_path), image_size=8)
    assert calls == [], "Ghostscript was run on a file from the suite's directory"
    assert str(tmp_path / "train" / "cat" / "1.png") in one_line(info.value)


def test_image_folder_decompression_bomb_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / split / "cat" / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: Pillow raises, not warns
    with pytest.raises(EebenchError, match="decompression bomb") as info:
        ds.image_folder(root=str(tmp_path), image_size=8)
    one_line(info.value)


# ------------------------------------------------------------------------------------------
# weights: torchvision's hub cache, timm's files and the harness's checkpoints are weights-only


def test_a_planted_torchvision_hub_file_runs_no_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision reads a cached file with weights_only=False; the built-in loads it weights-only."""
    from torchvision import models

    from eebench_plugins.backbones.torchvision_nets import build_torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    cached.write_bytes(pickle.dumps({"conv1.weight": WritesFile(marker)}, protocol=2))
    with pytest.raises(EebenchError) as info:
        build_torchvision("resnet18", 10, (3, 32, 32), weights="IMAGENET1K_V1")
    assert not marker.exists(), "the planted hub file ran code"
    message = one_line(info.value)
    assert info.value.key == "weights" and "IMAGENET1K_V1" in message and str(tmp_path / "torch") in message
    assert "UnpicklingError: Weights only load failed" in message and "\x1b" not in message


def test_genuine_torchvision_weights_still_load_from_the_hub_cache(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import models

    from eebench_plugins.backbones.torchvision_nets import build_torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    imagenet = models.resnet18().state_dict()
    torch.save(imagenet, cached)
    model = build_torchvision("resnet18", 10, (3, 96, 96), weights="IMAGENET1K_V1")
    assert torch.equal(model.layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    assert model.fc.out_features == 10


def test_timm_pretrained_file_is_weights_only(tmp_path: Path) -> None:
    """timm >= 1.0 loads weights-only by default; a suite's pretrained_cfg_overlay cannot change that."""
    from eebench_plugins.backbones.timm_nets import timm_backbone

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"stem.weight": WritesFile(marker)}, protocol=2))
    with pytest.raises(RuntimeError, match="weights_only"):  # build_plugin makes a backbone's RuntimeError one line
        timm_backbone("test_resnet", 10, (3, 32, 32), pretrained=True, pretrained_cfg_overlay={"file": str(evil)})
    assert not marker.exists()


def test_a_crafted_backbone_checkpoint_runs_no_code(tmp_path: Path) -> None:
    from eebench.basenet import load_checkpoint

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"weight": WritesFile(marker)}, evil)
    with pytest.raises(EebenchError, match="UnpicklingError: Weights only load failed"):
        load_checkpoint(torch.nn.Linear(2, 2), evil, "suite.yaml", "backbones[0].checkpoint")
    assert not marker.exists()
