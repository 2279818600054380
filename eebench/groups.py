"""Cells grouped by the frozen-backbone pass they share, in a deterministic order.

Cells with the same dataset, backbone (and its params and checkpoint), recipe and seed train
the same base network and read the same shared activations (``eebench.activations``); run in
one process, one after another, they pay for those once. A group is what one worker of a
parallel run (``--jobs``, Ray, submitit) takes; the serial run walks the same groups in the same
order, so a multi-seed suite never drops one seed's activations to compute another's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from eebench.suite import Cell


@dataclass(frozen=True)
class CellGroup:
    """Cells sharing one base backbone, each with its 1-based position in the run's order."""

    index: int  # 1-based, in the run's order
    label: str  # dataset/backbone/seed, for progress lines
    cells: tuple[tuple[int, Cell], ...]

    @property
    def cell_ids(self) -> list[str]:
        return [cell.cell_id for _, cell in self.cells]


def base_key(cell: Cell) -> str:
    """What the base backbone (and so every shared pass over it) depends on."""
    return json.dumps({"dataset": cell.dataset.model_dump(exclude={"label"}),
                       "backbone": cell.backbone.model_dump(exclude={"label"}), "seed": cell.seed},
                      sort_keys=True, default=str)


def group_cells(cells: list[Cell]) -> list[CellGroup]:
    """Groups in the order of their first cell in ``cells`` (the suite's order), cells inside a group in
    that order too; positions number the cells group after group. The same cells give the same groups."""
    members: dict[str, list[Cell]] = {}
    for cell in cells:
        members.setdefault(base_key(cell), []).append(cell)
    groups, position = [], 0
    for index, group in enumerate(members.values(), 1):
        placed = []
        for cell in group:
            position += 1
            placed.append((position, cell))
        first = group[0]
        groups.append(CellGroup(index, f"{first.dataset.display}/{first.backbone.display}/s{first.seed}",
                                tuple(placed)))
    return groups
