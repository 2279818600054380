"""DEC's clustering maths: Student-t soft assignments, the target distribution, k-means.

Kept free of training loops so the formulas can be checked against hand-computed values.
"""

from __future__ import annotations

import torch
from torch import nn


def squared_distances(z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||z_i - mu_j||^2 as [N, K], exact (broadcast difference, differentiable)."""
    return (z[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


def soft_assignment(z: torch.Tensor, centres: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC eq. 1: q_ij ∝ (1 + ||z_i − mu_j||²/α)^(−(α+1)/2), normalised over clusters j."""
    kernel = (1.0 + squared_distances(z, centres) / alpha).pow(-(alpha + 1.0) / 2.0)
    return kernel / kernel.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC eq. 3: p_ij = (q_ij² / f_j) / Σ_j' (q_ij'² / f_j'), f_j = Σ_i q_ij over the given rows.

    Squaring sharpens confident assignments; dividing by the soft cluster frequency keeps
    large clusters from swallowing the others.
    """
    weight = q.pow(2) / q.sum(0, keepdim=True)
    return weight / weight.sum(1, keepdim=True)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) = Σ p log(p/q), averaged over the rows (DEC eq. 2 per sample)."""
    p = p.clamp_min(1e-12)
    return (p * (p.log() - q.clamp_min(1e-12).log())).sum() / p.shape[0]


class ClusteringLayer(nn.Module):
    """Trainable cluster centres mu [K, D]; forward gives the soft assignments q."""

    def __init__(self, num_clusters: int, dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.centres = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return soft_assignment(z, self.centres, self.alpha)


def _plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            index = int(torch.randint(n, (1,), generator=generator))
        else:
            index = int(torch.multinomial(closest / total, 1, generator=generator))
        centres.append(x[index])
        closest = torch.minimum(closest, (x - x[index]).pow(2).sum(1))
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 20, max_iter: int = 300, tol: float = 1e-4,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs by inertia.

    Returns (centres [k, D], labels [N], inertia). Runs in float64; ``tol`` is relative to
    the data variance as in scikit-learn. An emptied cluster is re-seeded at the sample
    farthest from its centre.
    """
    generator = generator or torch.Generator().manual_seed(0)
    data = x.detach().double().cpu()
    shift = tol * float(data.var(0).mean())
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(n_init):
        centres = _plus_plus(data, k, generator)
        for _ in range(max_iter):
            distance = torch.cdist(data, centres).pow(2)
            labels = distance.argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, labels, data)
            counts = torch.bincount(labels, minlength=k).double()
            new = sums / counts.clamp_min(1)[:, None]
            for empty in (counts == 0).nonzero().flatten().tolist():
                far = int(distance.gather(1, labels[:, None]).squeeze(1).argmax())
                new[empty] = data[far]
            moved = float((new - centres).pow(2).sum())
            centres = new
            if moved <= shift:
                break
        distance = torch.cdist(data, centres).pow(2)
        labels = distance.argmin(1)
        inertia = float(distance.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[2]:
            best = (centres, labels, inertia)
    assert best is not None
    return best[0].to(x.dtype), best[1], best[2]
