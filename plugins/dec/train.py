"""DEC's clustering stage: k-means initialisation, then KL(P‖Q) self-training (Sec. 3.1).

Follows the paper (and DEC-keras), not pt-dec: the target distribution P is recomputed
from the whole training set every ``update_interval`` iterations and held fixed in
between; training stops at such an update once fewer than ``tol`` of the samples changed
their hard assignment since the previous one (or at ``dec_max_iterations``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from eebench_plugins.dec.clustering import ClusteringLayer, kl_divergence, kmeans, target_distribution
from eebench_plugins.dec.loop import Meter, PhaseLog, check_finite, in_chunks, make_optimizer
from eebench_plugins.dec.recipes import DECRecipe


def init_centres(encoder: nn.Module, layer: ClusteringLayer, data: torch.Tensor, recipe: DECRecipe,
                 generator: torch.Generator, meter: Meter, macs: float) -> torch.Tensor:
    """k-means (n_init restarts) on the embeddings of the whole training set; returns its labels."""
    z = in_chunks(encoder, data)
    meter.forward(data.shape[0], macs)
    centres, labels, _ = kmeans(z, layer.centres.shape[0], n_init=recipe.kmeans_n_init, generator=generator)
    with torch.no_grad():
        layer.centres.copy_(centres.to(layer.centres))
    return labels


def train_dec(encoder: nn.Module, layer: ClusteringLayer, data: torch.Tensor, recipe: DECRecipe,
              generator: torch.Generator, meter: Meter, macs: float, name: str = "dec") -> PhaseLog:
    """Jointly refine the trainable parameters of ``encoder`` and the centres of ``layer``."""
    tick = time.perf_counter()
    log = PhaseLog(name, stopped="max_iterations")
    params = [p for p in encoder.parameters() if p.requires_grad] + [layer.centres]
    optimizer = make_optimizer("sgd", params, recipe.dec_lr, recipe.dec_momentum)
    batches = meter.batches(data.shape[0], recipe.batch_size, generator, macs)
    previous: torch.Tensor | None = None
    changed: list[float] = []
    target = torch.empty(0)
    iteration = 0
    encoder.train()
    while True:
        if iteration % recipe.update_interval == 0:
            with torch.no_grad():
                q = in_chunks(lambda x: layer(encoder(x)), data)
            meter.forward(data.shape[0], macs)
            target = target_distribution(q)
            assignment = q.argmax(1)
            if previous is not None:
                changed.append(float((assignment != previous).double().mean()))
                if changed[-1] < recipe.tol:
                    log.stopped = "tol"
                    break
            previous = assignment
        if iteration >= recipe.dec_max_iterations:
            break
        index = next(batches, None)
        if index is None:
            log.stopped = "budget"
            break
        loss = kl_divergence(target[index], layer(encoder(data[index])))
        check_finite(loss, name, iteration, "dec_lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        if iteration % recipe.update_interval == 1:
            log.record(loss.item())
    batches.close()
    encoder.eval()
    log.iterations = iteration
    log.extra["changed"] = [round(c, 5) for c in changed]
    log.seconds = time.perf_counter() - tick
    return log
