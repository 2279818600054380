"""E²CM-DEC: unsupervised early exit with DEC clustering (E²CM paper Sec. III-C, IV-D; spec §7.3).

DEC_large is the standard DEC (d–500–500–2000–10 encoder + clustering layer). DEC_small and
DEC_middle copy DEC_large's first one and two encoder layers, freeze them, and train their
own new 500→10 embedding layer and clustering layer the same way (DAE pre-training of the
new layer on the frozen features, fine-tuning, k-means, KL self-training). Since the frozen
layers stay bit-identical to DEC_large's (checked after training), one forward pass through
DEC_large's trunk gives all three exits.

Exit rule (E²CM, Algorithm 1 on clusters): at exit j, Euclidean distances from the exit's
10-d embedding to its own cluster centres mu_j, divided by their mean over the training split
(eq. 4), softmax of the negative normalised distances; exit when its max is > T_j. The
exit's prediction is its DEC's own hard assignment, the nearest centre (= argmax of the
Student-t q), so each exit is exactly its DEC and the full-cost end is DEC_large; Algorithm
1's argmin of the *normalised* distances (which the divisors can change for a few samples)
is available as ``prediction: e2cm``.

Labels are never used to train or to choose thresholds:
- the calibration trace compares each exit with DEC_large's own cluster assignments (each
  exit's clusters aligned to DEC_large's by Hungarian matching of their co-assignment on the
  training split), so the calibration hull maximises agreement with DEC_large
  (``calibration_view``);
- for reported accuracy only, each exit's clusters are mapped to classes by Hungarian
  matching on the training labels (spec §7.3.7), and an exited sample is scored through its
  exit's mapping. NMI and ARI are reported too (``MethodReport.extra_metrics``).

Cost (MACs, batch 1): the trunk up to the exit + the exit's new 500→10 layer (counted by the
core on the module) + the distances to the K centres as E²CM prices them from the core's
cost table (``ClassMeansExit.overhead_macs``: D·K + D + 4K with D = 10, not the E²CM code's
K·(3·10−1) elementary operations), over every exit evaluated so far; the softmax (3K) only
with ``count_softmax``. 1.00 is DEC_large alone: its encoder plus its distance MACs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from eebench.api import (
    Budget,
    EebenchError,
    ExitCosts,
    ExitState,
    ExitStrategy,
    ExitTrace,
    MethodContext,
    MethodReport,
    OperatingPoint,
    StagedBackbone,
    StepOutput,
    count_macs,
    iterate_batches,
    softmax_macs,
    stage_taps,
)
from eebench_plugins.class_means import ClassMeansExit
from eebench_plugins.dec.backbone import DECEncoder, xavier_relu_
from eebench_plugins.dec.clustering import ClusteringLayer
from eebench_plugins.dec.loop import Meter, in_chunks, linear_macs
from eebench_plugins.dec.metrics import ari, cluster_accuracy, hungarian_mapping, nmi
from eebench_plugins.dec.pretrain import pretrain
from eebench_plugins.dec.recipes import PRESETS, DECRecipe, recipe_from
from eebench_plugins.dec.train import init_centres, train_dec
from eebench_plugins.manifests.dec import DECE2CMParams


def clustering_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """NMI and ARI of each row of final test predictions [V, N] against the true labels."""
    return {"NMI": [nmi(row, labels) for row in preds], "ARI": [ari(row, labels) for row in preds]}


def inverse_permutation(mapping: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(mapping)
    inverse[mapping] = torch.arange(mapping.numel(), dtype=mapping.dtype)
    return inverse


class DECE2CM(ExitStrategy):
    """Multi-exit DEC with E²CM exits (see the module docstring)."""

    Params = DECE2CMParams

    strict = True
    default_calibrator = "per-exit-bisection"

    def __init__(
        self,
        backbone: StagedBackbone,
        context: MethodContext,
        recipe: str | Mapping[str, Any] | DECRecipe = "paper",
        exit_stages: list[int] | tuple[int, ...] = (0, 1),
        count_softmax: bool = False,
        prediction: str = "dec",
    ) -> None:
        super().__init__(backbone, context)
        if not isinstance(backbone, DECEncoder):
            raise EebenchError(f"dec-e2cm needs the 'dec' backbone, got '{backbone.backbone_name}'; expected "
                               "backbones: [{name: dec}] for this method")
        try:
            self.recipe: DECRecipe = recipe_from(recipe)
        except ValueError as exc:
            raise EebenchError(str(exc), key="recipe") from exc
        last = len(backbone.stages) - 1
        self.exit_stages = sorted({int(s) for s in exit_stages})
        if not self.exit_stages or any(s < 0 or s >= last for s in self.exit_stages):
            raise EebenchError(f"exit_stages must be encoder layers before the embedding (0..{last - 1}), "
                               f"got {list(exit_stages)}", key="exit_stages")
        self.count_softmax = count_softmax
        if prediction not in ("dec", "e2cm"):
            raise EebenchError(f"prediction must be 'dec' or 'e2cm', got {prediction!r}", key="prediction")
        self.prediction = prediction
        self.num_clusters = backbone.head.centres.shape[0]
        self.dim = backbone.head.centres.shape[1]
        widths = backbone.widths
        self.heads = nn.ModuleList(xavier_relu_(nn.Linear(widths[s], self.dim)) for s in self.exit_stages)
        self.layers = nn.ModuleList(ClusteringLayer(self.num_clusters, self.dim, backbone.head.alpha)
                                    for _ in self.exit_stages)
        self.trunks = nn.ModuleList()
        self.exits = nn.ModuleList(ClassMeansExit((self.dim,), self.num_clusters, None)
                                   for _ in range(len(self.exit_stages) + 1))
        size = max(self.num_clusters, context.num_classes)
        self._reset_maps(size)
        self.fit_log: dict[str, Any] = {}
        self.notes = (
            f"E²CM-DEC (recipe {self.recipe_name()}): DEC_small/DEC_middle freeze DEC_large's first layers and "
            "train their own 10-unit layer + clustering layer; exit when softmax(−eq. 4-normalised distance to the "
            "exit's cluster centres) > T_j. Thresholds are chosen without labels: the calibration trace scores "
            "agreement with DEC_large's own training-set clusters. Test accuracy maps each exit's clusters to "
            "classes by Hungarian matching on the training labels (evaluation only). Cost 1.00 = DEC_large (encoder + "
            "its distance MACs, D·K + D + 4K from the core's cost table); the suite's budget only caps DEC's "
            "training, whose length the recipe sets."
        )

    def recipe_name(self) -> str:
        """``'quick'``, or ``'quick' with lr, tol overridden``, for the notes."""
        base = PRESETS[self.recipe.preset]
        changed = [name for name in DECRecipe.model_fields if getattr(self.recipe, name) != getattr(base, name)]
        return f"'{self.recipe.preset}'" + (f" with {', '.join(changed)} overridden" if changed else "")

    def _reset_maps(self, size: int) -> None:
        exits = len(self.exit_stages) + 1
        self.truth_maps = torch.arange(size).repeat(exits, 1)  # cluster -> class, per exit (evaluation only)
        self.to_large = torch.arange(size).repeat(exits, 1)  # cluster -> DEC_large's cluster, per exit

    # ------------------------------------------------------------------ training

    def _collect(self, train: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for x, y in iterate_batches(train, self.context.batch_size, device=self.context.device,
                                    description="dec data"):
            xs.append(x.flatten(1).float())
            ys.append(y.cpu())
        return torch.cat(xs), torch.cat(ys)

    def fit(self, train: Dataset, budget: Budget) -> None:
        meter = Meter(budget)
        recipe, backbone = self.recipe, self.backbone
        generator = torch.Generator().manual_seed(self.context.seed)
        data, labels = self._collect(train)
        linears = backbone.linears
        logs = pretrain(linears, data, layerwise_iterations=recipe.pretrain_iterations,
                        finetune_iterations=recipe.finetune_iterations, recipe=recipe, generator=generator,
                        meter=meter, name="DEC_large SAE")
        macs = linear_macs(linears)
        encoder = nn.Sequential(*backbone.stages)  # the same modules, trained in place
        kmeans_labels = init_centres(encoder, backbone.head, data, recipe, generator, meter, macs)
        kmeans_acc = {"DEC_large": cluster_accuracy(kmeans_labels, labels)}
        logs.append(train_dec(encoder, backbone.head, data, recipe, generator, meter, macs, name="DEC_large KL"))
        names = self._names()
        for k, stage in enumerate(self.exit_stages):
            trunk = copy.deepcopy(nn.Sequential(*backbone.stages[: stage + 1])).requires_grad_(False).eval()
            self.trunks.append(trunk)
            features = in_chunks(trunk, data)
            meter.forward(data.shape[0], linear_macs(linears[: stage + 1]))
            head, layer = self.heads[k], self.layers[k]
            logs += pretrain([head], features, layerwise_iterations=recipe.head_pretrain,
                             finetune_iterations=recipe.head_finetune, recipe=recipe, generator=generator,
                             meter=meter, name=f"{names[k]} SAE")
            head_macs = linear_macs([head])
            kmeans_acc[names[k]] = cluster_accuracy(
                init_centres(head, layer, features, recipe, generator, meter, head_macs), labels)
            logs.append(train_dec(head, layer, features, recipe, generator, meter, head_macs, name=f"{names[k]} KL"))
        self._check_frozen()
        self._fit_exits(data, labels)
        # the exits' fit embeds the training data once more: DEC_large's trunk and every head
        meter.forward(data.shape[0], macs + linear_macs(list(self.heads)))
        self.fit_log = {
            "recipe": recipe.to_dict(),
            "phases": [vars(log) for log in logs],
            "kmeans_train_accuracy": kmeans_acc,
            "train_accuracy": self._train_accuracy,
        }

    def _check_frozen(self) -> None:
        """The smaller DECs' copied layers must equal DEC_large's bit for bit (one shared pass)."""
        large = self.backbone.stages.state_dict()
        for trunk in self.trunks:
            if any(not torch.equal(value, large[key]) for key, value in trunk.state_dict().items()):
                raise RuntimeError("a smaller DEC's frozen layers drifted from DEC_large's")

    @torch.no_grad()
    def _embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's 10-d embedding from one pass through DEC_large's trunk."""
        taps, out = stage_taps(self.backbone, x, self.exit_stages)
        return [self._embedding(j, tap) for j, tap in enumerate(taps)] + [out]

    def _embedding(self, j: int, features: torch.Tensor) -> torch.Tensor:
        """Exit j's 10-d embedding: its own 500→10 layer on the trunk's output; DEC_large's is the encoder's."""
        return self.heads[j](features) if j < len(self.heads) else features

    @torch.no_grad()
    def _fit_exits(self, data: torch.Tensor, labels: torch.Tensor) -> None:
        """Cluster centres into the E²CM exits, eq. 4 divisors, and the per-exit alignments."""
        centres = [layer.centres for layer in self.layers] + [self.backbone.head.centres]
        for exit_module, mu in zip(self.exits, centres, strict=True):
            exit_module.sums.copy_(mu.detach().double())
            exit_module.counts.fill_(1.0)
        chunks = [self._embeddings(data[i : i + 4096]) for i in range(0, data.shape[0], 4096)]
        size = self.truth_maps.shape[1]
        clusters = []
        for j, exit_module in enumerate(self.exits):
            distances = torch.cat([exit_module.distances(c[j]) for c in chunks])
            exit_module.set_divisors(distances)
            clusters.append(self._assign(distances, exit_module.divisors).cpu())
        self.truth_maps = torch.stack([hungarian_mapping(c, labels, size) for c in clusters])
        self.to_large = torch.stack([hungarian_mapping(c, clusters[-1], size) for c in clusters])
        names = self._names()
        self._train_accuracy = {names[j]: cluster_accuracy(c, labels) for j, c in enumerate(clusters)}

    # ------------------------------------------------------------------ inference

    def exit_taps(self) -> list[int]:
        return list(self.exit_stages)

    @torch.no_grad()
    def exit_step(self, j: int, features: torch.Tensor, state: ExitState) -> StepOutput:
        """Exit j's E²CM score on its clusters, and its cluster mapped to a class (evaluation mapping)."""
        exit_module = self.exits[j]
        distances = exit_module.distances(self._embedding(j, features))
        score = torch.softmax(-distances / exit_module.divisors, dim=1).max(1).values
        cluster = self._assign(distances, exit_module.divisors)
        return StepOutput(self.truth_maps[j].to(cluster.device)[cluster], score)

    def _assign(self, distances: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
        """The exit's cluster: its DEC's own hard assignment (nearest centre), or with
        ``prediction: e2cm`` Algorithm 1's argmin of the eq. 4-normalised distances."""
        return (distances / divisors if self.prediction == "e2cm" else distances).argmin(1)

    def calibration_view(self, trace: ExitTrace) -> ExitTrace:
        """Label-free calibration: each exit's cluster (aligned to DEC_large's) vs DEC_large's own."""
        raw = [inverse_permutation(self.truth_maps[j])[trace.preds[j]] for j in range(trace.num_exits)]
        preds = torch.stack([self.to_large[j][raw[j]] for j in range(trace.num_exits)])
        return ExitTrace(preds, trace.scores, raw[-1], strict=trace.strict, chained=trace.chained)

    def report(self) -> MethodReport:
        return MethodReport(exit_names=self._names(), notes=self.notes, operating_points=self._operating_points(),
                            fit_info=self.fit_log, extra_metrics=clustering_metrics)

    def _operating_points(self) -> list[OperatingPoint]:
        """Each DEC on its own: everybody leaves at its exit, earlier exits off (+inf: no overhead).

        The exit's threshold is 0: a max softmax over K clusters is >= 1/K, so it always fires
        (-inf, "always exit", would do the same).
        """
        points = []
        names = self._names()
        for j, name in enumerate(names):
            thresholds = torch.full((len(names) - 1,), float("inf"), dtype=torch.float64)
            if j < len(names) - 1:
                thresholds[j] = 0.0
            points.append(OperatingPoint(name, thresholds))
        return points

    def exit_costs(self) -> ExitCosts:
        stage_costs = self.context.stage_costs
        k = self.num_clusters
        extra = softmax_macs(k) if self.count_softmax else 0.0
        last = len(self.backbone.stages) - 1
        backbone = [stage_costs.through(s) for s in self.exit_stages] + [stage_costs.through(last)]
        overhead = [count_macs(h, torch.zeros(1, h.in_features, device=h.weight.device)) + e.overhead_macs(k) + extra
                    for h, e in zip(self.heads, self.exits, strict=False)]
        final = self.exits[-1].overhead_macs(k) + extra
        return ExitCosts(torch.tensor(backbone, dtype=torch.float64),
                         torch.tensor([*overhead, final], dtype=torch.float64), backbone[-1] + final)

    def _names(self) -> list[str]:
        if self.exit_stages == [0, 1] and len(self.backbone.stages) == 4:
            return ["DEC_small", "DEC_middle", "DEC_large"]
        return [f"DEC_layer{s + 1}" for s in self.exit_stages] + ["DEC_large"]

    def modules(self) -> list[nn.Module]:
        """The encoder, the exits' layers and clustering layers, and the E²CM exits (centres and divisors
        as buffers). The smaller DECs' frozen trunks are bit-identical copies of the encoder's first layers
        (``_check_frozen``) that inference never runs, so they are not saved."""
        return [self.backbone, self.heads, self.layers, self.exits]

    def state_dict(self) -> dict[str, Any]:
        """The modules plus the per-exit cluster maps (cluster → class for the reported accuracy, cluster →
        DEC_large's cluster for the calibration view), which are plain tensors."""
        return {**super().state_dict(), "truth_maps": self.truth_maps.clone(), "to_large": self.to_large.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.truth_maps, self.to_large = state["truth_maps"].clone(), state["to_large"].clone()
