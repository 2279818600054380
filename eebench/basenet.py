"""The base backbone: trained once by the suite's recipe, cached by content hash.

The cache key covers dataset (with its subsets), backbone, recipe and seed, so every
method of a suite starts from the very same weights and a second run trains nothing.
Checkpoints are plain state dicts loaded with ``torch.load(weights_only=True)``.

The cache heals itself: an entry whose weights cannot be loaded (corrupt, truncated, stale)
is a cache miss, moved aside as ``<key>.pt.corrupt-<timestamp>`` with one line on stderr, and
retrained. A cache that cannot take the trained weights (disk full) is reported in one line;
the run goes on with the weights in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.datasets import Augment
from eebench.errors import EebenchError, check_writable
from eebench.model import StagedBackbone
from eebench.passes import iterate_batches
from eebench.suite import Recipe


def cache_dir() -> Path:
    root = os.environ.get("EEBENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "eebench"


def cache_paths(digest: str) -> tuple[Path, Path]:
    """The weights and the metadata file of a cache entry (the metadata marks it complete)."""
    folder = cache_dir() / "backbones"
    return folder / f"{digest}.pt", folder / f"{digest}.json"


def cache_entry_ready(digest: str) -> bool:
    """A complete entry is in the cache (whether its weights load is found out when they are read)."""
    weights, meta = cache_paths(digest)
    return weights.is_file() and _read_meta(meta) is not None


def _warn(line: str) -> None:
    print(f"eebench: warning: {line}", file=sys.stderr)


def _move_aside(weights: Path, meta: Path, why: str) -> None:
    """A damaged cache entry is renamed ``*.corrupt-<timestamp>`` (kept for a post-mortem), said in one line."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = weights.with_name(f"{weights.name}.corrupt-{stamp}")
    try:
        os.replace(weights, aside)
        with suppress(OSError):
            os.replace(meta, meta.with_name(f"{meta.name}.corrupt-{stamp}"))
        where = f"moved aside to {aside}"
    except OSError as exc:
        where = f"could not be moved aside ({exc.strerror})"
    _warn(f"cached backbone {weights} is unreadable ({why}); {where}; retraining it")


def _save_atomic(folder: Path, target: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file unique to this writer, then rename it onto ``target``;
    the temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.stem[:20]}-", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _read_meta(meta: Path) -> dict | None:
    try:
        info = json.loads(meta.read_text())
        return info if isinstance(info, dict) and {"test_accuracy", "train_seconds", "train_samples"} <= set(info) \
            else None
    except (OSError, ValueError, TypeError):
        return None


def content_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class BaseInfo:
    """What a cell needs to know about its base backbone."""

    key: str
    test_accuracy: float | None  # None when eebench did not train it (recipe epochs: 0)
    train_seconds: float
    train_samples: int
    cached: bool
    source: str


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)


def train_backbone(
    model: StagedBackbone,
    train: Dataset,
    recipe: Recipe,
    *,
    augment: Augment | None,
    seed: int,
    device: torch.device,
    where: str = "suite",
    key: str = "backbones",
) -> int:
    """Train with cross-entropy by the recipe; returns samples seen. NaN loss is an error."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, recipe)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = max(1, math.ceil(recipe.epochs * steps_per_epoch))
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        if recipe.schedule == "cosine" else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 1)
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step, seen = 0, 0
    for epoch in range(math.ceil(recipe.epochs)):
        stream = iterate_batches(train, recipe.batch_size, device=device, shuffle=True, generator=generator,
                                 description=f"base training epoch {epoch + 1}/{math.ceil(recipe.epochs)}")
        for x, y in stream:
            if step >= total_steps:
                stream.close()
                break
            if recipe.augment and augment is not None:
                x = augment(x, generator)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise EebenchError(f"base training loss became {loss.item()} at step {step}; "
                                   "expected a finite loss (try a lower lr)", where=where, key=f"{key}.recipe")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            seen += int(y.shape[0])
    model.eval()
    return seen


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for x, y in iterate_batches(dataset, batch_size, device=device, description="backbone test accuracy"):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, len(dataset))


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line without terminal colour codes (torch's weights-only refusal has both)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def load_checkpoint(model: nn.Module, path: Path, where: str, key: str) -> None:
    if not path.is_file():
        raise EebenchError(f"checkpoint '{path}' does not exist; expected a state_dict file", where=where, key=key)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as exc:
        raise EebenchError(f"cannot load checkpoint '{path}': {type(exc).__name__}: {first_line(exc)[:160]}; "
                           "expected a state_dict matching the backbone", where=where, key=key) from exc


def prepare_backbone(
    model: StagedBackbone,
    payload: dict,
    train: Dataset,
    test: Dataset,
    recipe: Recipe,
    *,
    augment: Augment | None,
    seed: int,
    device: torch.device,
    checkpoint: str | None,
    eval_batch_size: int,
    where: str,
    key: str,
) -> BaseInfo:
    """Load the cached (or given) weights into ``model``, training them first if needed."""
    model.to(device)
    if checkpoint:
        load_checkpoint(model, Path(checkpoint), where, f"{key}.checkpoint")
        model.to(device)
        acc = accuracy(model, test, eval_batch_size, device)
        return BaseInfo(content_hash({**payload, "checkpoint": checkpoint}), acc, 0.0, 0, True,
                        f"checkpoint {checkpoint}")
    digest = content_hash(payload)
    weights, meta = cache_paths(digest)
    folder = weights.parent
    info = _read_meta(meta) if weights.is_file() else None
    if info is not None:  # a missing or unreadable entry is a cache miss: retrain and overwrite it
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # corrupt, truncated or stale weights: a cache miss, healed
            first = " ".join(str(exc).split()).split(". ")[0][:160]  # the first sentence of torch's message
            _move_aside(weights, meta, f"{type(exc).__name__}: {first}")
        else:
            model.to(device).eval()
            return BaseInfo(digest, info["test_accuracy"], info["train_seconds"], info["train_samples"], True,
                            f"cache {weights}")
    # fail before training, not after: the trained weights must have somewhere to go
    check_writable(folder, "EEBENCH_CACHE", "a writable directory for the backbone cache (set EEBENCH_CACHE)")
    torch.manual_seed(seed)
    start = time.perf_counter()
    seen = train_backbone(model, train, recipe, augment=augment, seed=seed, device=device, where=where, key=key)
    seconds = time.perf_counter() - start
    acc = accuracy(model, test, eval_batch_size, device)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    record = json.dumps({"payload": payload, "test_accuracy": acc, "train_seconds": seconds,
                         "train_samples": seen}, indent=1, default=str)
    try:
        _save_atomic(folder, weights, lambda tmp: torch.save(state, tmp))
        # the metadata last and atomically: it marks the entry complete
        _save_atomic(folder, meta, lambda tmp: tmp.write_text(record))
    except OSError as exc:  # the weights are in memory: this run goes on, the next one retrains them
        _warn(f"cannot write the trained backbone to the cache at {weights} ({exc.strerror or exc}); this run "
              "goes on with it in memory, the next one trains it again")
    return BaseInfo(digest, acc, seconds, seen, False, "trained")
