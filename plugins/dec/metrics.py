"""Clustering metrics: Hungarian-matched accuracy, NMI and ARI from one contingency table.

Cluster indices are arbitrary, so accuracy needs a one-to-one cluster→class matching
(Hungarian, scipy); NMI and ARI are invariant to relabelling and need none.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def contingency(pred: torch.Tensor, true: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Counts M[p, t] of samples in cluster p with label t; square, side max(K_pred, K_true)."""
    pred, true = pred.long().cpu(), true.long().cpu()
    side = size if size is not None else (int(max(int(pred.max()), int(true.max()))) + 1 if pred.numel() else 1)
    table = torch.zeros(side * side, dtype=torch.long)
    table.index_add_(0, pred * side + true, torch.ones_like(pred))
    return table.view(side, side)


def hungarian_mapping(pred: torch.Tensor, true: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """mapping[cluster] = the label it is matched to, maximising the matched count."""
    table = contingency(pred, true, size).numpy()
    rows, cols = linear_sum_assignment(table.max() - table)
    mapping = torch.empty(table.shape[0], dtype=torch.long)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return mapping


def cluster_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """DEC's unsupervised accuracy: the best one-to-one matching's share of samples."""
    if pred.numel() == 0:
        return 0.0
    table = contingency(pred, true).numpy()
    rows, cols = linear_sum_assignment(table.max() - table)
    return float(table[rows, cols].sum()) / pred.numel()


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default)."""
    table = contingency(pred, true).numpy().astype(np.float64)
    n = int(table.sum())
    if n == 0:
        return 0.0
    rows, cols = table.sum(1), table.sum(0)
    h_pred, h_true = _entropy(rows, n), _entropy(cols, n)
    if h_pred == 0 and h_true == 0:
        return 1.0
    nz = table > 0
    outer = np.outer(rows, cols)
    mutual = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    denominator = (h_pred + h_true) / 2
    return max(0.0, mutual / denominator) if denominator > 0 else 0.0


def ari(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Adjusted Rand index (Hubert & Arabie): pair agreement corrected for chance."""
    table = contingency(pred, true).numpy().astype(np.float64)
    n = float(table.sum())
    pairs = (table * (table - 1) / 2).sum()
    rows = (table.sum(1) * (table.sum(1) - 1) / 2).sum()
    cols = (table.sum(0) * (table.sum(0) - 1) / 2).sum()
    total = n * (n - 1) / 2
    if total == 0:
        return 1.0
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    if math.isclose(maximum, expected):
        return 1.0
    return float((pairs - expected) / (maximum - expected))
