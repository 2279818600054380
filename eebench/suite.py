"""YAML suites: a guarded loader, a validated schema, plugin checks, and expansion into cells.

A cell is one (dataset, backbone, method, budget, seed) combination. Its config hash
covers everything that changes its numbers, so a rerun skips cells already done.

What ``load_suite`` refuses before any work (each as one line naming the file, the key and what
was expected):

* a file over ``MAX_SUITE_BYTES`` (1 MiB; checked before parsing), not UTF-8, or not YAML;
* YAML tags (safe loading), a key twice in one mapping (PyYAML would silently keep the last),
  a recursive alias, and aliases that expand to more than ``MAX_YAML_NODES`` nodes (each use
  of an alias counts its whole subtree: a "billion laughs" file is refused at load time);
* NaN and infinite numbers anywhere (targets, recipes, params), seeds outside
  ``[0, SEED_MAX]`` or listed twice, counts above ``MAX_COUNT``, a ``reference`` that is not one
  of the suite's method labels;
* names that become file names: the suite ``name``, plugin names and ``label``s longer than
  ``MAX_NAME_BYTES`` or holding control characters or line breaks, a cell id (hence a cell
  file name) over ``MAX_CELL_ID_BYTES``, two entries that map to the same file name, and more
  than ``MAX_CELLS`` cells.

``check_plugins`` then checks every plugin name and its ``params`` against the plugin's declared
schema (``eebench.params``), the same check ``run`` builds the plugin with.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eebench.errors import EebenchError, build_plugin
from eebench.lazy import LazyFactory, declared_attribute, resolve
from eebench.params import check_params, location, printable
from eebench.plugins import Registry

MAX_SUITE_BYTES = 1 << 20  # a suite file larger than 1 MiB is refused before it is parsed
MAX_YAML_NODES = 100_000  # YAML nodes after alias expansion (an alias counts its whole subtree each time)
MAX_NAME_BYTES = 64  # suite name, plugin names and labels (UTF-8 bytes): they become parts of file names
MAX_CELL_ID_BYTES = 200  # "<cell id>.json" plus a temporary suffix stays under the usual 255-byte limit
MAX_CELLS = 100_000  # datasets x backbones x methods x budgets x seeds
MAX_COUNT = 2**31 - 1  # sizes, subsets and batch sizes
# Seeds are 0 <= seed <= 2**31 - 1: numpy's legacy RNG takes [0, 2**32) and torch [−2**63, 2**64), and eebench
# derives further seeds by adding offsets below 2**31 (the holdout split uses seed + 7919), which then stay valid.
SEED_MAX = 2**31 - 1
ZTW_TARGETS = (0.25, 0.5, 0.75, 1.0)  # Zero-Time-Waste's "accuracy at 25/50/75/100 % of the base cost"

Strict = ConfigDict(extra="forbid", allow_inf_nan=False)
Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]


def check_text(value: str, what: str, limit: int | None = MAX_NAME_BYTES) -> str:
    """A name that becomes (part of) a file name: bounded length, no control characters or line breaks."""
    for index, char in enumerate(value):
        if unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp"):
            raise ValueError(f"{what} has the control character {char!r} at position {index}; expected printable "
                             "text without line breaks (it becomes part of file names)")
    size = len(value.encode("utf-8"))
    if limit is not None and size > limit:
        raise ValueError(f"{what} is {size} bytes long; expected at most {limit} bytes (UTF-8), as it becomes "
                         "part of file names")
    return value


def check_path(value: str | None, what: str) -> str | None:
    if value is not None:
        check_text(value, what, limit=4096)
    return value


class PluginRef(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_text(value, "the plugin name")

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, "the label")

    @property
    def display(self) -> str:
        return self.label or self.name


class DatasetSpec(PluginRef):
    train_subset: Count | None = None
    per_class: Count | None = None
    test_subset: Count | None = None
    calibration: Literal["train", "holdout"] = "train"
    holdout: Count = 5000


class Recipe(BaseModel):
    """How eebench trains the base backbone (cached by content hash)."""

    model_config = Strict
    epochs: float = Field(3, ge=0, le=1_000_000)  # 0: left at its plugin's init, for methods that train it (DEC)
    batch_size: Count = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: bool = True


class BackboneSpec(PluginRef):
    recipe: Recipe = Field(default_factory=Recipe)
    checkpoint: str | None = None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str | None) -> str | None:
        return check_path(value, "the checkpoint path")


class MethodSpec(PluginRef):
    calibrator: PluginRef | None = None


class Outputs(BaseModel):
    model_config = Strict
    run_dir: str | None = None
    leaderboard_dir: str = "leaderboards"

    @field_validator("run_dir", "leaderboard_dir")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return check_path(value, "the directory")


class LatencySpec(BaseModel):
    """How ``eebench bench`` (or a suite's ``latency:`` block) times the early-exit networks.

    ``batch_sizes``: 1 = one sample at a time; larger ones run with compaction (and masking when
    ``masked``). ``samples``: the test split's first samples streamed at the larger batch sizes (0 = all),
    ``batch1_samples`` at batch 1. ``targets``: the φ policies timed (default: the suite's).
    ``threads``: torch's CPU thread count for the timing (default: as the process has it)."""

    model_config = Strict

    batch_sizes: list[Count] = Field(default_factory=lambda: [1, 256], min_length=1)
    targets: list[float] | None = None
    samples: int = Field(1024, ge=0)
    batch1_samples: Count = 300
    repeats: Count = 5
    warmup: int = Field(1, ge=0)
    threads: Count | None = None
    masked: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        return sorted(set(value))


class Suite(BaseModel):
    model_config = Strict
    name: str
    description: str = ""
    notes: list[str] = Field(default_factory=list)
    datasets: list[DatasetSpec] = Field(min_length=1)
    backbones: list[BackboneSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    budgets: list[PluginRef] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    targets: list[float] = Field(default_factory=lambda: [0.15, 0.20, 0.25, 0.30, 0.50], min_length=1)
    batch_size: Count = 256
    train_batch_size: Count = 128
    outputs: Outputs = Field(default_factory=Outputs)
    latency: LatencySpec | None = None  # time every finished cell's early-exit network after the run
    # the method label paired differences are taken against (same seed, same base backbone), if any
    reference: str | None = None
    # also evaluate and show accuracy at 25/50/75/100 % of the base cost (Zero-Time-Waste's tables)
    ztw_columns: bool = False

    @property
    def computed_targets(self) -> list[float]:
        """The cost targets every cell evaluates: the suite's, φ = 1, and the ZTW points when asked for."""
        return sorted({*self.targets, 1.0, *(ZTW_TARGETS if self.ztw_columns else ())})

    @field_validator("name")
    @classmethod
    def _suite_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or len(value) > MAX_NAME_BYTES:
            raise ValueError(f"the suite name must be 1 to {MAX_NAME_BYTES} letters, digits, '-', '_' or '.', "
                             "starting with a letter or digit (it names the run directory and the leaderboard "
                             "file)")
        return value

    @field_validator("targets")
    @classmethod
    def _positive_targets(cls, value: list[float]) -> list[float]:
        if any(t <= 0 for t in value):
            raise ValueError("every cost target must be > 0 (a fraction of the plain backbone's cost)")
        return sorted(value)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        for seed in value:
            if not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seed {seed} is out of range; expected an integer in [0, {SEED_MAX}] (0 <= seed "
                                 "< 2**31, so that every seed eebench derives from it stays valid for numpy and torch)")
        twice = sorted({s for s in value if value.count(s) > 1})
        if twice:
            raise ValueError(f"seed {twice[0]} appears twice; expected distinct seeds")
        return value


def file_part(text: str) -> str:
    """A name as it appears in a cell id (``Cell.cell_id``)."""
    return text.replace(":", "_").replace("/", "_").replace(" ", "_")


def file_slug(text: str) -> str:
    """A name as it appears in a leaderboard or figure file name (``eebench.leaderboard.slug``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


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
        return "-".join(file_part(p) for p in parts)


# ---------------------------------------------------------------------------------------- loading


class SuiteRefused(Exception):
    """A problem the guarded loader found: ``key`` (a ``methods[0].params`` path) and what was expected."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


MERGE_TAG = "tag:yaml.org,2002:merge"


def _child(path: str, part: Any) -> str:
    return location([part], path)


def inspect_tree(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Refuse duplicate keys, recursive aliases and alias bombs in a composed YAML document.

    Returns the number of nodes the document expands to (each use of an alias counts its whole
    subtree). Iterative and memoised: linear in the composed size, whatever the expansion.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        nid = id(node)
        if done:
            on_path.discard(nid)
            size = 1 + sum(sizes[id(child)] for child, _ in _children(node, path))
            if size > limit:
                raise SuiteRefused(path or "(top level)", f"the document expands to more than {limit:,} YAML nodes "
                                   "(each use of an alias counts its whole subtree); expected a smaller suite, "
                                   "without exponentially nested aliases")
            sizes[nid] = size
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise SuiteRefused(path or "(top level)", "an alias refers to a node that contains it; expected "
                               "no recursive aliases")
        on_path.add(nid)
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            _duplicates(node, path)
        stack.extend((child, child_path, False) for child, child_path in reversed(_children(node, path)))
    return sizes[id(root)]


def _children(node: yaml.Node, path: str) -> list[tuple[yaml.Node, str]]:
    if isinstance(node, yaml.SequenceNode):
        return [(child, _child(path, i)) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = []
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG else None
            out.append((key, path))
            out.append((value, _child(path, name) if name is not None else path))
        return out
    return []


def _duplicates(node: yaml.MappingNode, path: str) -> None:
    seen: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        first = seen.setdefault((key.tag, key.value), key)
        if first is not key:
            lines = f"lines {first.start_mark.line + 1} and {key.start_mark.line + 1}"
            raise SuiteRefused(_child(path, key.value), f"duplicate key '{printable(key.value)}' ({lines}); expected "
                               "each key once in a mapping (YAML would keep only the last)")


class SuiteLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also refuses duplicate keys, recursive aliases and alias bombs."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None:
            inspect_tree(node)
        return node


def _read_text(path: Path, where: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise EebenchError(f"the file is {size:,} bytes; expected a suite of at most {MAX_SUITE_BYTES:,} bytes "
                               "(1 MiB)", where=where, key="(file size)")
        with path.open("rb") as handle:
            data = handle.read(MAX_SUITE_BYTES + 1)
    except OSError as exc:
        raise EebenchError(f"cannot read the suite file ({exc.strerror or exc}); expected a readable YAML file",
                           where=where) from exc
    if len(data) > MAX_SUITE_BYTES:
        raise EebenchError(f"the file is over {MAX_SUITE_BYTES:,} bytes; expected a suite of at most 1 MiB",
                           where=where, key="(file size)")
    return decode_yaml(data, where)


def decode_yaml(data: bytes, where: str) -> str:
    """UTF-8 text (a BOM allowed) of a YAML file's bytes; a bad byte is one line naming its offset and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EebenchError(f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8; expected a UTF-8 "
                           "encoded YAML file", where=where, key=f"line {line}") from exc


def parse_yaml(text: str, where: str, what: str) -> Any:
    """Safe YAML (duplicate keys, aliases and tags refused by ``SuiteLoader``); any problem is one line
    naming ``where`` and the key or line (``what``, e.g. "a suite", says what was expected)."""
    try:
        return yaml.load(text, Loader=SuiteLoader)  # noqa: S506 -- SuiteLoader is a SafeLoader
    except SuiteRefused as exc:
        raise EebenchError(exc.message, where=where, key=exc.key) from exc
    except yaml.YAMLError as exc:
        key, problem = _yaml_problem(exc)
        raise EebenchError(f"not valid YAML: {problem}", where=where, key=key) from exc
    except RecursionError as exc:
        raise EebenchError(f"the YAML nests too deeply; expected {what} of ordinary depth", where=where,
                           key="(parse)") from exc


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):
        return "(parse)", (f"unacceptable character #x{exc.character:04x} at position {exc.position}"
                           if isinstance(exc.character, int) else exc.reason)
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"line {mark.line + 1}" if mark else "(parse)"), printable(str(problem))


def _suite_detail(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        detail = "unknown key"
    elif kind == "missing":
        detail = "required key is missing"
    elif kind == "finite_number":
        detail = "expected a finite number"
    elif kind in ("value_error", "assertion_error"):
        cause = (error.get("ctx") or {}).get("error")
        detail = str(cause) if cause is not None else error["msg"]
    else:
        detail = error["msg"]
    shown = repr(error.get("input"))
    return f"{detail} (input: {shown if len(shown) <= 60 else shown[:57] + '...'})"


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; every problem is one line naming file and key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise EebenchError("no such suite file; expected a YAML file", where=where)
    text = _read_text(path, where)
    raw = parse_yaml(text, where, "a suite")
    if not isinstance(raw, dict):
        raise EebenchError("expected a mapping with keys name, datasets, backbones, methods, budgets",
                           where=where, key="(top level)")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EebenchError(_suite_detail(first), where=where, key=location(first["loc"]) or "(top level)") from exc
    except RecursionError as exc:
        raise EebenchError("the suite nests too deeply; expected a suite of ordinary depth", where=where,
                           key="(top level)") from exc
    check_names(suite, where)
    check_reference(suite, where)
    return suite


def check_reference(suite: Suite, where: str) -> None:
    """``reference`` names one of the suite's method labels (what the leaderboard's rows are called)."""
    if suite.reference is None:
        return
    labels = [m.display for m in suite.methods]
    if suite.reference not in labels:
        shown = ", ".join(f"'{printable(label)}'" for label in labels)
        raise EebenchError(f"'{printable(suite.reference)}' is not a method label of this suite; expected one of "
                           f"{shown} (a method's label, else its name)", where=where, key="reference")


# ---------------------------------------------------------------------------------------- names


def _cell_count(suite: Suite) -> int:
    return math.prod(len(x) for x in (suite.datasets, suite.backbones, suite.methods, suite.budgets, suite.seeds))


def _clashes(items: list[tuple[str, str, Any]], what: str, where: str, rule: str) -> None:
    """``items``: (key in the suite, shown name, file-name identity); two equal identities are an error."""
    seen: dict[Any, tuple[str, str]] = {}
    for key, shown, identity in items:
        if identity in seen:
            other_key, other = seen[identity]
            if other == shown:
                raise EebenchError(f"{what} '{printable(shown)}' appears twice ({other_key} and {key}); expected a "
                                   "distinct label for each", where=where, key=key)
            raise EebenchError(f"{what} '{printable(shown)}' and '{printable(other)}' ({other_key}) map to the same "
                               f"file name; expected labels that stay distinct when {rule}", where=where, key=key)
        seen[identity] = (key, shown)


def _label_key(kind: str, index: int, spec: PluginRef) -> str:
    return f"{kind}[{index}].{'label' if spec.label else 'name'}"


def check_names(suite: Suite, where: str) -> None:
    """Names that become file names: distinct after slugging, and cell ids short enough for a file name."""
    cells = _cell_count(suite)
    if cells > MAX_CELLS:
        raise EebenchError(f"the suite expands to {cells:,} cells; expected at most {MAX_CELLS:,}", where=where,
                           key="(top level)")
    cell_rule = "':', '/' and ' ' become '_' and letter case is ignored (cell ids)"
    slug_rule = "characters other than letters, digits, '-', '_' and '.' become '_' and case is ignored (figures)"
    _clashes([(_label_key("methods", i, m), m.display, file_part(m.display).casefold())
              for i, m in enumerate(suite.methods)], "method", where, cell_rule)
    _clashes([(_label_key("datasets", i, d), d.display, file_slug(d.display).casefold())
              for i, d in enumerate(suite.datasets)], "dataset", where, slug_rule)
    _clashes([(_label_key("backbones", i, b), b.display, file_slug(b.display).casefold())
              for i, b in enumerate(suite.backbones)], "backbone", where, slug_rule)
    _clashes([(_label_key("budgets", i, b), b.display,
               (file_part(b.display).casefold(), b.name, json.dumps(b.params, sort_keys=True, default=str)))
              for i, b in enumerate(suite.budgets)], "budget", where, cell_rule)
    parts = {
        "datasets": [(f"datasets[{i}].name", d.name) for i, d in enumerate(suite.datasets)],
        "backbones": [(f"backbones[{i}].name", b.name) for i, b in enumerate(suite.backbones)],
        "methods": [(_label_key("methods", i, m), m.display) for i, m in enumerate(suite.methods)],
        "budgets": [(_label_key("budgets", i, b), b.display) for i, b in enumerate(suite.budgets)],
    }
    longest = {kind: max(items, key=lambda item: len(file_part(item[1]).encode())) for kind, items in parts.items()}
    fixed = len(f"s{max(suite.seeds)}") + 8 + 5  # seed, hash prefix, separators
    total = fixed + sum(len(file_part(name).encode()) for _, name in longest.values())
    if total > MAX_CELL_ID_BYTES:
        key, name = max(longest.values(), key=lambda item: len(file_part(item[1]).encode()))
        raise EebenchError(f"the longest cell id would be {total} bytes (dataset, backbone, method and budget names "
                           f"joined, the longest being '{printable(name)}'); expected at most {MAX_CELL_ID_BYTES} "
                           "bytes so that cell file names stay valid: shorten the longest", where=where, key=key)


# ---------------------------------------------------------------------------------------- plugins


def _serves(methods: Any, name: str, factory: Any) -> bool:
    """A calibrator's ``for_methods`` (registered names or ExitStrategy classes) covers this method.

    Names are compared as they are; a class entry (a third party's) imports a lazy method to compare.
    """
    if any(m == name for m in methods if isinstance(m, str)):
        return True
    classes = [m for m in methods if isinstance(m, type)]
    if not classes:
        return False
    target = resolve(inspect.unwrap(factory)) if callable(factory) else factory
    return isinstance(target, type) and any(issubclass(target, m) for m in classes)


def check_plugins(suite: Suite, registry: Registry, where: str) -> None:
    """Every named plugin exists and its params pass its declared schema (or its signature)."""
    for i, spec in enumerate(suite.datasets):
        factory = registry.get("datasets", spec.name, where=where, key=f"datasets[{i}].name")
        check_params(factory, spec.params, where=where, key=f"datasets[{i}].params")
    for i, spec in enumerate(suite.backbones):
        factory = registry.get("backbones", spec.name, where=where, key=f"backbones[{i}].name")
        check_params(factory, spec.params, where=where, key=f"backbones[{i}].params", skip=2)
    for i, spec in enumerate(suite.methods):
        factory = registry.get("exit_strategies", spec.name, where=where, key=f"methods[{i}].name")
        check_params(factory, spec.params, where=where, key=f"methods[{i}].params", skip=2)
        if spec.calibrator is not None:
            name, key = spec.calibrator.name, f"methods[{i}].calibrator"
            cal = registry.get("calibrators", name, where=where, key=f"{key}.name")
            kwargs = check_params(cal, spec.calibrator.params, where=where, key=f"{key}.params")
            if not isinstance(cal, LazyFactory):  # a lazy one's Params refuses what its constructor would
                # calibrators are cheap to build: a value only the constructor rejects fails here, before any work
                build_plugin(cal, where, f"{key}.params", params=kwargs)
        else:
            name = declared_attribute(factory, "default_calibrator")
            key = f"methods[{i}] (default calibrator)"
            cal = registry.get("calibrators", name, where=where, key=key) if name else None
        methods = declared_attribute(cal, "for_methods") if cal is not None else None
        if isinstance(methods, (tuple, list, frozenset, set)) and methods and not _serves(methods, spec.name, factory):
            served = ", ".join(sorted(n for n, f in registry.factories["exit_strategies"].items()
                                      if _serves(methods, n, f))) or "other methods"
            raise EebenchError(f"calibrator '{name}' calibrates only {served}, not '{spec.name}'; expected another "
                               "calibrator", where=where, key=key)
    for i, spec in enumerate(suite.budgets):
        factory = registry.get("budgets", spec.name, where=where, key=f"budgets[{i}].name")
        kwargs = check_params(factory, spec.params, where=where, key=f"budgets[{i}].params")
        if not isinstance(factory, LazyFactory):  # a lazy one's Params refuses what its constructor would
            # budgets are cheap to build: bad values (epochs: 0) fail here, before any training
            build_plugin(factory, where, f"budgets[{i}].params", params=kwargs)


def expand(suite: Suite) -> list[Cell]:
    return [
        Cell(d, b, m, g, s, suite.batch_size, suite.train_batch_size)
        for d, b, m, g, s in itertools.product(
            suite.datasets, suite.backbones, suite.methods, suite.budgets, suite.seeds
        )
    ]
