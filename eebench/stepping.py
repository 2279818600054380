"""The core's walk through a staged backbone, exit by exit: one engine for traces and inference.

``run_all_exits`` asks every exit about every row (a trace: no decision is taken);
``run_early_exit`` runs the real early-exit network: at each exit the rows whose rule fires
leave, and, with compaction, only the survivors go on through the next stages. Both make the
same ``ExitStrategy.exit_step`` calls, so a trace and the executor cannot disagree.
"""

from __future__ import annotations

import torch

from eebench.strategy import ExitOutputs, ExitState, ExitStrategy, StepOutput
from eebench.trace import ExitOutputError, output_values_problem, pair_problem

INF = float("inf")


def exit_stages(strategy: ExitStrategy) -> list[int]:
    """The stage each exit reads: the early exits' taps, then the last stage (the final exit)."""
    return [*strategy.exit_taps(), len(strategy.backbone.stages) - 1]


def step_problem(out: object, rows: int, variants: int | None, num_classes: int | None) -> str | None:
    """What is wrong with one ``exit_step`` output for ``rows`` rows, or None: ``StepOutput`` of preds
    and scores [B] (or [P, B], P == ``variants`` when known), valid values, a ``detail`` of B rows."""
    problem = pair_problem(out, "StepOutput")
    if problem:
        return problem
    preds, scores = out.preds, out.scores  # type: ignore[attr-defined]
    shape = list(preds.shape)
    if preds.ndim not in (1, 2) or shape[-1] != rows:
        return f"outputs are {shape} for {rows} rows; expected [B] or [P, B], the batch as the last dimension"
    if preds.ndim == 2 and variants is not None and shape[0] != variants:
        return f"outputs are {shape}; expected [B] or [P, B] with P == len(report().variants) == {variants}"
    detail = getattr(out, "detail", None)
    if detail is not None and (not isinstance(detail, torch.Tensor) or detail.ndim < 1 or detail.shape[0] != rows):
        what = list(detail.shape) if isinstance(detail, torch.Tensor) else type(detail).__name__
        return f"detail is {what} for {rows} rows; expected None or a tensor [B, ...]"
    problem = output_values_problem(preds.unsqueeze(-2), scores.unsqueeze(-2), num_classes)
    return problem.replace(" (at exits [0])", "") if problem else None


def checked_step(strategy: ExitStrategy, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
    """``strategy.exit_step`` with its output checked (``step_problem``; ExitOutputError names the exit)."""
    out = strategy.exit_step(j, features, state)
    problem = step_problem(out, int(features.shape[0]), None, None)
    if problem:
        raise ExitOutputError(f"exit_step({j}) {problem}")  # compute_traces names the plugin and the batch
    return out


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B] or [P, B] per exit -> [E, B] or [P, E, B] (a [B] exit is shared by every variant)."""
    variants = max((p.shape[0] for p in parts if p.ndim == 2), default=0)
    if not variants:
        return torch.stack(parts)
    return torch.stack([p if p.ndim == 2 else p[None].expand(variants, -1) for p in parts], dim=1)


@torch.no_grad()
def run_all_exits(strategy: ExitStrategy, x: torch.Tensor) -> tuple[ExitOutputs, list[torch.Tensor | None]]:
    """Every exit's outputs for every row of ``x`` (stages run once), and each exit's ``detail``."""
    state = strategy.init_state(x)
    h = x
    preds, scores, details = [], [], []
    for j, segment in enumerate(ExitPlan(strategy).segments):
        h = _run(segment, h)
        out = checked_step(strategy, j, h, state)
        preds.append(out.preds)
        scores.append(out.scores.double())
        details.append(out.detail)
    return ExitOutputs(_stack(preds), _stack(scores)), details


def pick_variant(out: StepOutput, variant: torch.Tensor | None) -> StepOutput:
    """One variant's outputs per row: ``variant`` [B] picks a row of [P, B] outputs."""
    if out.preds.ndim == 1:
        return out
    index = (variant if variant is not None else torch.zeros(out.preds.shape[1], dtype=torch.long,
                                                                device=out.preds.device))[None]
    return StepOutput(out.preds.gather(0, index)[0], out.scores.gather(0, index)[0], out.detail)


def _take(state: ExitState, rows: torch.Tensor) -> ExitState:
    return {key: value[rows] for key, value in state.items()}


def _channels_last(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous(memory_format=torch.channels_last) if h.ndim == 4 else h


class ExitPlan:
    """What the executor needs of a strategy, looked up once: the stages between consecutive exits,
    and whether the method keeps the default threshold rule (then batch 1 decides on Python floats)."""

    def __init__(self, strategy: ExitStrategy) -> None:
        stages = list(strategy.backbone.stages)
        self.strategy = strategy
        self.segments: list[list[torch.nn.Module]] = []
        done = -1
        for tap in exit_stages(strategy):
            self.segments.append(stages[done + 1 : tap + 1])
            done = tap
        self.final = len(self.segments) - 1
        self.chained = bool(strategy.chained)
        self.strict = bool(strategy.strict)
        self.default_rule = type(strategy).decide is ExitStrategy.decide


def _run(segment: list[torch.nn.Module], h: torch.Tensor) -> torch.Tensor:
    for stage in segment:
        h = stage(h)
    return h


@torch.no_grad()
def run_one(plan: ExitPlan, x: torch.Tensor, limits: list[float], variant: torch.Tensor | None = None) -> tuple[int,
                                                                                                             int]:
    """Batch 1: (exit index, prediction) of the one sample ``x``, stopping at the first exit that fires.
    ``limits`` are its thresholds as floats; ``variant`` [1] its rule variant (None: the only one)."""
    strategy = plan.strategy
    state = strategy.init_state(x)
    h = x
    for j, segment in enumerate(plan.segments):
        h = _run(segment, h)
        final = j == plan.final
        if not final and limits[j] == INF and not plan.chained:
            continue
        out = pick_variant(strategy.exit_step(j, h, state), variant)
        if plan.default_rule:
            if final:
                return j, int(out.preds[0])
            score = float(out.scores[0])  # exact: float64 comparisons, as exit_fires and the trace make
            if score != -INF and (score > limits[j] if plan.strict else score >= limits[j]):
                return j, int(out.preds[0])
            continue
        limit = torch.full((1,), INF if final else limits[j], dtype=torch.float64, device=x.device)
        fires, picked = strategy.decide(j, out, limit, state)
        if final or bool(fires[0]):
            return j, int(picked[0])
    raise AssertionError("the final exit always fires")


@torch.no_grad()
def run_early_exit(strategy: ExitStrategy | ExitPlan, x: torch.Tensor, thresholds: torch.Tensor,
                   variant: torch.Tensor | None = None, *, compact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The early-exit network on a batch: ([B] exit index, [B] prediction) of every row.

    ``thresholds`` [B, E-1] (float64, +inf = exit off for that row) and ``variant`` [B] (the rule
    variant each row runs) may differ per row, which is how a φ policy mixes two hull vertices.
    ``compact``: rows that leave drop out of the batch and the survivors alone run on (batch 1
    is this with B = 1: it stops at the first exit that fires). Otherwise (masking) the whole
    batch runs every stage until every row has left; rows that left are only ignored.
    An early exit that no running row has on is skipped (its head is not run), unless the
    method is ``chained``, as the MAC model assumes.
    """
    plan = strategy if isinstance(strategy, ExitPlan) else ExitPlan(strategy)
    strategy = plan.strategy
    rows = int(x.shape[0])
    device = x.device
    final = plan.final
    exit_index = torch.full((rows,), final, dtype=torch.long, device=device)
    preds = torch.zeros(rows, dtype=torch.long, device=device)
    limits = thresholds.to(device=device, dtype=torch.float64)
    enabled = limits != INF
    always = enabled.all(0).tolist()  # per exit: every row has it on (no per-exit check needed)
    never = (~enabled.any(0)).tolist()  # per exit: no row has it on (skipped unless chained)
    live = torch.arange(rows, device=device)  # original row of each row of h
    pending = None if compact else torch.ones(rows, dtype=torch.bool, device=device)  # masking: not left yet
    variants = None if variant is None else variant.to(device)
    state = strategy.init_state(x)
    h = x
    for j, segment in enumerate(plan.segments):
        h = _run(segment, h)
        if j == final:
            on, limit, ask = pending, torch.full((h.shape[0],), INF, dtype=torch.float64, device=device), None
        else:
            if never[j] and not plan.chained:
                continue
            limit, ask = limits[:, j], None
            if plan.chained:  # every row is asked; rows with the exit off only may not leave
                on = None if always[j] and compact else enabled[:, j] if compact else enabled[:, j] & pending
            elif compact:  # only the rows with the exit on are asked
                on = None
                if not always[j]:
                    mask = enabled[:, j]
                    if not bool(mask.any()):
                        continue
                    if not bool(mask.all()):
                        ask = mask.nonzero()[:, 0]
            else:  # masked: the whole batch is asked; rows that left or have the exit off may not leave
                on = enabled[:, j] & pending
                if not bool(on.any()):
                    continue
        if ask is None:
            sub_state, out = state, strategy.exit_step(j, h, state)
            sub_limit, sub_variant = limit, variants
        else:
            sub_state = _take(state, ask)
            out = strategy.exit_step(j, h[ask], sub_state)
            sub_limit, sub_variant = limit[ask], None if variants is None else variants[ask]
        fires, picked = strategy.decide(j, pick_variant(out, sub_variant), sub_limit, sub_state)
        if ask is not None:
            for key, value in sub_state.items():
                state[key][ask] = value
            leaving = ask[fires]
        else:
            if on is not None:
                fires = fires & on  # rows whose exit is off (chained), or that left already (masking)
            leaving = fires.nonzero()[:, 0]
        count = int(leaving.numel())
        if count:
            exit_index[live[leaving]] = j
            preds[live[leaving]] = picked[fires]
        if j == final:
            break
        if compact:
            if count == h.shape[0]:
                break
            if count:
                keep = torch.ones(h.shape[0], dtype=torch.bool, device=device)
                keep[leaving] = False
                h, live, limits, enabled = _channels_last(h[keep]), live[keep], limits[keep], enabled[keep]
                variants = None if variants is None else variants[keep]
                state = _take(state, keep)
        elif count:
            pending[leaving] = False
            if not bool(pending.any()):
                break
    return exit_index, preds
