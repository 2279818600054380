"""Stacked denoising-autoencoder pre-training, then end-to-end fine-tuning (DEC paper Sec. 3.2).

Layer-wise: each encoder layer is trained as a one-hidden-layer DAE on the previous layer's
(clean) output, with dropout on the DAE's input and on its hidden code (the paper; pt-sdae
corrupts only the code). Activations follow the paper ("except for g2 of the first pair,
which reconstructs the input, and g1 of the last pair, so the embedding keeps full
information, all are ReLUs"): ReLU everywhere except the embedding (last encoder layer) and
the first pair's decoder. Then all encoders and the decoders in reverse order form one deep
autoencoder, fine-tuned on clean inputs (the paper is silent on corruption here; DEC-keras
uses none).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from eebench_plugins.dec.backbone import xavier_relu_
from eebench_plugins.dec.loop import Meter, PhaseLog, check_finite, in_chunks, linear_macs, optimizer_for
from eebench_plugins.dec.recipes import DECRecipe


def _act(x: torch.Tensor, relu: bool) -> torch.Tensor:
    return torch.relu(x) if relu else x


class StackedAutoencoder(nn.Module):
    """Encoder layers (shared with the backbone) and their own decoders, in reverse order."""

    def __init__(self, encoders: list[nn.Linear]) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(xavier_relu_(nn.Linear(e.out_features, e.in_features)) for e in encoders)

    def encoder_relu(self, i: int) -> bool:
        return i < len(self.encoders) - 1

    def decoder_relu(self, i: int) -> bool:
        return i > 0  # only the first pair's decoder (the reconstruction of the input) is linear

    def encode(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.encoders[:upto]):
            x = _act(layer(x), self.encoder_relu(i))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        for i in range(len(self.decoders) - 1, -1, -1):
            z = _act(self.decoders[i](z), self.decoder_relu(i))
        return z

    def pair(self, i: int, x: torch.Tensor, dropout: float) -> torch.Tensor:
        """Layer i's DAE: corrupt input, encode, corrupt code, decode."""
        h = _act(self.encoders[i](F.dropout(x, dropout)), self.encoder_relu(i))
        return _act(self.decoders[i](F.dropout(h, dropout)), self.decoder_relu(i))


def _fit(forward, params: list[nn.Parameter], data: torch.Tensor, iterations: int, recipe: DECRecipe,
         generator: torch.Generator, meter: Meter, macs: float, log: PhaseLog) -> PhaseLog:
    """Minimise the mean squared reconstruction error of ``data`` for ``iterations`` steps."""
    tick = time.perf_counter()
    if iterations == 0:
        return log
    optimizer, schedule = optimizer_for(params, recipe)
    batches = meter.batches(data.shape[0], recipe.batch_size, generator, macs)
    try:
        for step in range(iterations):
            index = next(batches, None)
            if index is None:
                log.stopped = "budget"
                break
            x = data[index]
            loss = F.mse_loss(forward(x), x)
            check_finite(loss, log.name, step, "lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            log.iterations += 1
            if step % 50 == 0 or step == iterations - 1:
                log.record(loss.item())
    finally:
        batches.close()
    log.seconds = time.perf_counter() - tick
    return log


def pretrain(encoders: list[nn.Linear], data: torch.Tensor, *, layerwise_iterations: int, finetune_iterations: int,
             recipe: DECRecipe, generator: torch.Generator, meter: Meter, name: str = "sae") -> list[PhaseLog]:
    """Train ``encoders`` (in place) as a stacked autoencoder of ``data``; returns the phase logs."""
    model = StackedAutoencoder(encoders).to(data.device)
    model.train()
    logs = []
    features = data
    for i, (encoder, decoder) in enumerate(zip(model.encoders, model.decoders, strict=True)):
        params = [*encoder.parameters(), *decoder.parameters()]
        logs.append(_fit(lambda x, i=i: model.pair(i, x, recipe.dropout), params, features, layerwise_iterations,
                         recipe, generator, meter, 2 * linear_macs([encoder]), PhaseLog(f"{name} layer {i + 1}")))
        if i < len(model.encoders) - 1:
            features = in_chunks(lambda x, i=i: _act(model.encoders[i](x), model.encoder_relu(i)), features)
            meter.forward(features.shape[0], linear_macs([encoder]))
    logs.append(_fit(model, list(model.parameters()), data, finetune_iterations, recipe, generator, meter,
                     2 * linear_macs(list(model.encoders)), PhaseLog(f"{name} fine-tuning")))
    model.eval()
    return logs
