"""Where a result came from: the code (eebench version, git checkout, plugin packages), the libraries and
the machine. Every cell result records it so a number can be traced to what produced it, and the
leaderboard footer summarises it (``summary``), saying when cells differ.

Torch-free: library versions are read from the installed distributions' metadata, not by importing them.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import eebench

LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pandas")
_GIT_TIMEOUT = 10  # seconds; a hung git (a network filesystem) must not hang a run


def _git(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}, check=True)  # no index writes
    return done.stdout


def _code_dirs() -> list[Path]:
    """The source folders of eebench and its built-in plugins, as they really are (symlinks resolved)."""
    dirs = [Path(eebench.__file__).resolve().parent]
    try:
        import eebench_plugins  # a plain package (no torch at import)

        dirs.append(Path(eebench_plugins.__file__).resolve().parent)
    except ImportError:
        pass
    return dirs


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout eebench runs from; None when it is not in one (an installed
    wheel) or git is missing. ``dirty``: uncommitted changes (or untracked files) in the code's folders
    (eebench/ and the built-in plugins), not elsewhere in the checkout (run outputs, leaderboards)."""
    dirs = _code_dirs()
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], dirs[0]).strip())
        commit = _git(["rev-parse", "HEAD"], top).strip()
        inside = [str(d.relative_to(top)) for d in dirs if d.is_relative_to(top)]
        status = _git(["status", "--porcelain", "--", *inside], top)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose behaviour moves the numbers (None: not installed)."""
    return {**{name: _version(name) for name in LIBRARIES}, "python": platform.python_version()}


@lru_cache(maxsize=1)
def cpu() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``, else ``platform``) and the number of cores the OS reports."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count()}


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``, else ``nvidia-smi``), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word[:1].isdigit() and word.count(".") >= 1:
                return word
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=_GIT_TIMEOUT, check=True)
        return done.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def gpu(device: Any) -> dict[str, Any] | None:
    """Name, driver and CUDA runtime of the GPU a cell ran on; None on the CPU."""
    if getattr(device, "type", str(device).split(":", 1)[0]) != "cuda":
        return None
    import torch

    return {"name": torch.cuda.get_device_name(device), "driver": nvidia_driver(), "cuda": torch.version.cuda}


def plugin_packages(registry: Any) -> dict[str, str]:
    """The distributions providing ``eebench`` entry points, with their versions."""
    return {info.package: info.version for info in registry.plugins}


def environment(registry: Any, device: Any) -> dict[str, Any]:
    """The provenance fields a cell result records next to its device, threads and seconds."""
    return {"git": git_state(), "plugin_packages": plugin_packages(registry), "libraries": library_versions(),
            "cpu": cpu(), "gpu": gpu(device)}


# ------------------------------------------------------------------------------------ the board's footer


def _git_text(p: dict[str, Any]) -> str | None:
    if "git" not in p:
        return None
    git = p["git"]
    return "no git checkout" if git is None else \
        f"git {git['commit'][:10]}{' with uncommitted changes' if git.get('dirty') else ''}"


def _plugins_text(p: dict[str, Any]) -> str | None:
    packages = p.get("plugin_packages")
    return None if packages is None else ", ".join(f"{k} {v}" for k, v in sorted(packages.items())) or "none"


def _libraries_text(p: dict[str, Any]) -> str | None:
    libraries = p.get("libraries")
    if libraries is None:
        return None
    return ", ".join(f"{name} {version or 'absent'}" for name, version in libraries.items())


def _hardware_text(p: dict[str, Any]) -> str | None:
    if "cpu" not in p:
        return None
    text = f"{p['cpu'].get('model')} ({p['cpu'].get('cores')} cores)"
    gpu_info = p.get("gpu")
    if gpu_info:
        text += f", GPU {gpu_info.get('name')} (driver {gpu_info.get('driver') or '?'}, CUDA {gpu_info.get('cuda')})"
    return text


#: (what, how it reads from one cell's provenance; None = not recorded)
FIELDS: tuple[tuple[str, Callable[[dict[str, Any]], str | None]], ...] = (
    ("eebench", lambda p: p.get("eebench")),
    ("checkout", _git_text),
    ("plugin packages", _plugins_text),
    ("libraries", _libraries_text),
    ("hardware", _hardware_text),
    ("device", lambda p: p.get("device")),
)


def _one(values: list[str | None]) -> tuple[str, bool]:
    """The shared value, or each value with its cell count; and whether the cells differ."""
    counts = Counter(v or "not recorded" for v in values)
    if len(counts) == 1:
        return next(iter(counts)), False
    return "; ".join(f"{v} ({n} cell{'s' if n > 1 else ''})" for v, n in counts.most_common()), True


def summary(provenances: Iterable[dict[str, Any]]) -> list[str]:
    """One or two lines for a leaderboard's footer: what the cells ran with, and which fields differ."""
    items = [p if isinstance(p, dict) else {} for p in provenances]
    if not items:
        return []
    parts, differ = [], []
    for what, read in FIELDS:
        text, differs = _one([read(p) for p in items])
        parts.append(f"{what}: {text}")
        if differs:
            differ.append(what)
    lines = ["Provenance of the cells: " + " · ".join(parts) + "."]
    old = sum("libraries" not in p for p in items)
    if differ:
        lines.append(f"The cells differ in {', '.join(differ)}"
                     + (f" ({old} result(s) predate provenance recording)" if old else "")
                     + ": compare their numbers with care.")
    else:
        lines.append(f"All {len(items)} cells share this provenance.")
    return lines
