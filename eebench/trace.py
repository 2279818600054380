"""ExitTrace: every exit's prediction and score for every sample, as plain tensors.

One batched pass per split fills it; afterwards any threshold vector is evaluated with
tensor operations, so a thousand cost targets cost nothing next to one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from eebench.costs import ExitCosts
from eebench.passes import iterate_batches
from eebench.results import COLLAPSE_FACTOR
from eebench.strategy import ExitStrategy, exit_fires


def thresholds_to_json(row: torch.Tensor) -> list[float | str | None]:
    """One threshold vector as JSON: null = exit off (+inf), "-inf" = always exit, else the float."""
    return [None if t == float("inf") else "-inf" if t == float("-inf") else float(t) for t in row]


class ExitOutputError(ValueError):
    """A method's exit outputs break the contract the harness relies on (shape, dtype, NaN score,
    class id outside [0, K)); the message names the plugin."""


def output_values_problem(preds: torch.Tensor, scores: torch.Tensor, num_classes: int | None) -> str | None:
    """What is wrong with the values of exit outputs or a trace ([E, B] or [P, E, B]), or None:
    preds integer class ids in [0, K), scores floating (+-inf allowed), no NaN score."""
    if preds.is_floating_point() or preds.is_complex() or preds.dtype == torch.bool:
        return f"preds have dtype {preds.dtype}; expected integer class ids"
    if not scores.is_floating_point():
        return f"scores have dtype {scores.dtype}; expected a floating dtype"
    if preds.ndim < 2 or preds.shape[-2] < 1:
        return f"no exit in outputs of shape {list(preds.shape)}"
    nan = torch.isnan(scores)
    if bool(nan.any()):
        exits = sorted({int(j) for j in nan.nonzero()[:, -2]})
        return f"{int(nan.sum())} NaN scores (at exits {exits}); expected finite scores or +-inf"
    if num_classes is not None:
        bad = (preds < 0) | (preds >= num_classes)
        if bool(bad.any()):
            return (f"{int(bad.sum())} predictions outside [0, {num_classes}) (e.g. {int(preds[bad][0])}); "
                    "expected class ids")
    return None


def pair_problem(out: object, kind: str) -> str | None:
    """What is wrong with ``out`` as a ``kind`` (``ExitOutputs``, ``StepOutput``) before its shapes are
    read, or None: preds and scores must be tensors of one shape."""
    preds, scores = getattr(out, "preds", None), getattr(out, "scores", None)
    if not isinstance(preds, torch.Tensor) or not isinstance(scores, torch.Tensor):
        return f"returned {type(out).__name__}; expected {kind}(preds, scores) of tensors"
    if list(scores.shape) != list(preds.shape):
        return f"preds are {list(preds.shape)} but scores {list(scores.shape)}; expected the same shape"
    return None


def output_problem(out: object, *, variants: int, batch: int, num_classes: int | None) -> str | None:
    """What is wrong with one batch of exit outputs, or None: the contract of
    ``ExitOutputs`` (both [E, B], or [P, E, B] with P == ``variants``) and its values. The one check
    the core (``compute_traces``) and the conformance kit (``eebench.testing``) both run."""
    problem = pair_problem(out, "ExitOutputs")
    if problem:
        return problem
    preds, scores = out.preds, out.scores  # type: ignore[attr-defined]
    shape = list(preds.shape)
    if preds.ndim not in (2, 3) or (preds.ndim == 2 and variants != 1) or (preds.ndim == 3 and shape[0] != variants):
        return f"outputs are {shape}; expected [E, B] or [P, E, B] with P == len(MethodReport.variants) == {variants}"
    if shape[-1] != batch:
        return f"outputs are {shape} for a batch of {batch}; expected the batch as the last dimension ([E, B] or " \
               "[P, E, B])"
    return output_values_problem(preds, scores, num_classes)


def trace_problem(trace: object, *, samples: int, num_classes: int | None) -> str | None:
    """What is wrong with a trace a method hands the harness (``build_traces``, ``split_traces``,
    ``calibration_view``), or None."""
    if not isinstance(trace, ExitTrace):
        return f"returned {type(trace).__name__}; expected an ExitTrace"
    preds, scores, labels = trace.preds, trace.scores, trace.labels
    if preds.ndim != 2 or list(scores.shape) != list(preds.shape) or list(labels.shape) != [preds.shape[1]]:
        return (f"trace preds {list(preds.shape)}, scores {list(scores.shape)}, labels {list(labels.shape)}; "
                "expected [E, N], [E, N] and [N]")
    if preds.shape[1] != samples:
        return f"a trace of {preds.shape[1]} samples for a split of {samples}"
    problem = output_values_problem(preds, scores, num_classes)
    if problem:
        return problem
    if num_classes is not None and (labels.is_floating_point() or bool(((labels < 0) | (labels >= num_classes)).any())):
        return f"trace labels are not class ids in [0, {num_classes})"
    return None


def paid_exits(thresholds: torch.Tensor, chained: bool) -> torch.Tensor:
    """[V, E] which exits a threshold vector ([V, E-1]) pays for: those not switched off (+inf) and the
    last; for a ``chained`` rule also every exit before the last one paid."""
    enabled = torch.cat([thresholds != float("inf"), torch.ones_like(thresholds[:, :1], dtype=torch.bool)], 1)
    return enabled.flip(-1).cummax(-1).values.flip(-1) if chained else enabled


@dataclass(frozen=True)
class ExitAccuracy:
    """Each exit's own accuracy with every sample forced to leave there, against chance (the most
    frequent class's share of the split): an exit near chance is a broken classifier, not a trade-off."""

    forced: list[float]
    chance: float

    def collapsed(self, names: list[str]) -> list[str]:
        """Names of the exits at or below ``COLLAPSE_FACTOR`` × chance (``exit j`` where names are missing)."""
        if len(names) != len(self.forced):
            names = [f"exit {j}" for j in range(len(self.forced))]
        return [n for n, a in zip(names, self.forced, strict=True) if a <= COLLAPSE_FACTOR * self.chance]

    def to_dict(self, names: list[str]) -> dict[str, object]:
        return {"forced_test_accuracy": self.forced, "chance": self.chance, "collapsed": self.collapsed(names)}


def exit_accuracy(trace: ExitTrace) -> ExitAccuracy:
    """``ExitAccuracy`` of a trace: each exit's predictions (the class it would leave with) against the labels."""
    labels = trace.labels
    chance = float(labels.bincount().max()) / max(1, labels.numel()) if labels.numel() else 0.0
    forced = (trace.preds == labels[None, :]).double().mean(1) if labels.numel() else torch.zeros(trace.num_exits)
    return ExitAccuracy([float(a) for a in forced], chance)


@dataclass
class Evaluation:
    """Results of V threshold vectors on one trace."""

    cost: torch.Tensor  # [V] mean cost, normalised to the plain backbone
    accuracy: torch.Tensor  # [V]
    exit_counts: torch.Tensor  # [V, E] samples leaving at each exit


@dataclass
class ExitTrace:
    preds: torch.Tensor  # [E, N] long
    scores: torch.Tensor  # [E, N] float64
    labels: torch.Tensor  # [N] long
    strict: bool = True
    chained: bool = False  # an exit's score needs every earlier exit evaluated (e.g. patience)

    def __post_init__(self) -> None:
        self.scores = self.scores.double()  # thresholds sit between adjacent scores: keep full precision

    @property
    def num_exits(self) -> int:
        return int(self.preds.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.preds == self.labels[None, :]

    def first_exit(self, thresholds: torch.Tensor) -> torch.Tensor:
        """[V, N] index of the exit each sample leaves at (the last exit if none fires)."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        first = torch.full((thresholds.shape[0], self.num_samples), self.num_exits - 1, dtype=torch.long)
        for j in range(self.num_exits - 2, -1, -1):  # walking backwards leaves the earliest firing exit
            first.masked_fill_(exit_fires(self.scores[j], thresholds[:, j, None], self.strict), j)
        return first

    def outcome(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[V, N] exit index and [V, N] correctness of every sample under each vector.

        A method whose decision is not "the first exit whose score passes its threshold"
        (e.g. class exclusion, which carries a per-sample set of alive classes from exit
        to exit) subclasses ExitTrace, overrides this and ``first_exit``, and returns its
        trace from ``ExitStrategy.build_traces``; costs and hulls then work unchanged.
        """
        first = self.first_exit(thresholds)
        return first, self.correct.gather(0, first)

    def predictions(self, thresholds: torch.Tensor) -> torch.Tensor:
        """[V, N] the prediction each sample leaves with: its exit's prediction (a rule with its own
        final answer, like class exclusion's masked argmax, overrides this)."""
        first = self.first_exit(torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, self.num_exits - 1))
        return self.preds.gather(0, first)

    def evaluate(self, thresholds: torch.Tensor, costs: ExitCosts, chunk: int = 0) -> Evaluation:
        """Cost, accuracy and exit counts of each threshold vector ([V, E-1]).

        A threshold of +inf disables its exit: it never fires and its overhead is not paid
        (for ``chained`` methods every exit before the last enabled one is still paid).
        A threshold of -inf is the opposite, "always exit here": the exit is evaluated and paid.
        """
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        if thresholds.ndim == 1:
            thresholds = thresholds[None, :]
        if thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"expected {self.num_exits - 1} thresholds, got {thresholds.shape[1]}")
        chunk = chunk or max(1, int(2e7 // max(1, self.num_samples)))
        out_cost, out_acc = [torch.empty(0, dtype=torch.float64)], [torch.empty(0, dtype=torch.float64)]
        out_counts = [torch.empty(0, self.num_exits, dtype=torch.long)]
        for start in range(0, thresholds.shape[0], chunk):
            block = thresholds[start : start + chunk]
            enabled = paid_exits(block, self.chained)
            first, correct = self.outcome(block)  # [v, N] each
            rows = torch.arange(block.shape[0])[:, None] * self.num_exits
            counts = (first + rows).flatten().bincount(minlength=block.shape[0] * self.num_exits)
            counts = counts.view(block.shape[0], self.num_exits)
            out_counts.append(counts)
            out_cost.append((counts.double() * costs.normalised(enabled)).sum(1) / self.num_samples)
            out_acc.append(correct.sum(1).double() / self.num_samples)
        return Evaluation(torch.cat(out_cost), torch.cat(out_acc), torch.cat(out_counts))


@torch.no_grad()
def compute_traces(
    strategy: ExitStrategy,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    description: str = "trace",
    plugin: str | None = None,
    calibration: bool = False,
) -> list[ExitTrace]:
    """One batched pass over ``dataset`` asking every exit about every sample (``exit_step``, the
    calls the executor makes), turned into traces by ``strategy.build_traces``.

    A method whose outputs carry a leading variant dimension ([P, B]: one decision rule per
    hyper-parameter value, e.g. BWDS's lambda) gets one trace per variant, all from the same pass.
    For the ``calibration`` split a method may hand over traces it built without the images
    (``split_traces``).

    Every batch and every trace is checked at this boundary (``output_problem``, ``trace_problem``):
    a wrong shape or dtype, a NaN score or a class id outside [0, K) raises ExitOutputError naming
    ``plugin`` (by default the strategy's class).
    """
    from eebench.stepping import run_all_exits

    name = plugin or f"exit strategy {type(strategy).__name__}"
    context = getattr(strategy, "context", None)
    num_classes = getattr(context, "num_classes", None)
    variants = len(strategy.report().variants)
    strategy.eval()
    source = "split_traces"
    traces = strategy.split_traces(dataset) if calibration else None
    if traces is None:
        source = "build_traces"
        preds, scores, labels, details = [], [], [], []
        for index, (x, y) in enumerate(iterate_batches(dataset, batch_size, device=device,
                                                       description=description)):
            try:
                out, detail = run_all_exits(strategy, x)
            except ExitOutputError as exc:
                raise ExitOutputError(f"{name}: {description}, batch {index}: {exc}") from exc
            problem = output_problem(out, variants=variants, batch=int(y.shape[0]), num_classes=num_classes)
            if problem:
                raise ExitOutputError(f"{name}: {description}, batch {index}: exit_step outputs {problem}")
            preds.append(out.preds.cpu())
            scores.append(out.scores.cpu())
            labels.append(y.cpu())
            details.append([None if d is None else d.cpu() for d in detail])
        all_preds, all_scores = torch.cat(preds, dim=-1).long(), torch.cat(scores, dim=-1)
        if all_preds.ndim == 2:
            all_preds, all_scores = all_preds[None], all_scores[None]
        per_exit = [None if column[0] is None else torch.cat(list(column)) for column in zip(*details, strict=True)]
        traces = strategy.build_traces(all_preds, all_scores, torch.cat(labels).long(), per_exit)
    if not isinstance(traces, list) or len(traces) != variants:
        count = len(traces) if isinstance(traces, list) else type(traces).__name__
        raise ExitOutputError(f"{name}: {description}: {source} returned {count} traces for {variants} variants; "
                              "expected a list with one per MethodReport.variants entry")
    for trace in traces:
        problem = trace_problem(trace, samples=len(dataset), num_classes=num_classes)
        if problem:
            raise ExitOutputError(f"{name}: {description}: {source} {problem}")
    return traces


def compute_trace(strategy: ExitStrategy, dataset: Dataset, *, batch_size: int, device: torch.device | str,
                  description: str = "trace") -> ExitTrace:
    """The trace of a single-variant method (see ``compute_traces``)."""
    traces = compute_traces(strategy, dataset, batch_size=batch_size, device=device, description=description)
    if len(traces) != 1:
        raise ValueError(f"{type(strategy).__name__} has {len(traces)} variants; use compute_traces")
    return traces[0]
