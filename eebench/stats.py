"""Means with 95 % confidence intervals over seeds, and paired differences against a reference method.

What the leaderboard's "mean ± CI" means (``Interval.half_width`` is the ±):

* n ≥ 2 seeds: the Student-t interval of the mean over seeds, mean ± t(0.975, n − 1) · s / √n. Each seed
  draws its own subsets, trains its own base backbone and fits the method again, so it covers all of that.
* n = 1 seed: a 95 % percentile bootstrap over the test samples (``RESAMPLES`` resamples of the N test
  samples with replacement, a fixed seed). It covers the test split's sampling noise only, not the
  training noise of another seed, and is labelled "bootstrap over test samples". A per-sample value that
  takes a few distinct values (right or wrong) has a resample mean fixed by how many times each value is
  drawn, a multinomial draw of N over the values' frequencies: that is what is drawn, the same
  distribution as resampling indices at a fraction of the work.
* Paired differences (method − reference at the same φ) pair each seed's result with the reference's of the
  same seed on the same base backbone (hence the same test samples): Student-t over the seeds' differences,
  or with one seed a paired bootstrap over the test samples (both methods' per-sample correctness,
  ``eebench.samples``, resampled together). "Significant" means the interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from eebench.samples import unpack
from eebench.tidy import OUTCOMES

LEVEL = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the same board twice gives the same intervals
T_SEEDS = "Student-t over seeds"
BOOTSTRAP = "bootstrap over test samples"
KEYS = ["dataset", "backbone", "method", "budget", "phi"]  # one aggregated row per (…, φ)
PAIR_KEYS = ["dataset", "backbone", "budget", "phi", "seed"]  # what a method's result shares with its reference's
INTERVAL_COLUMNS = ["n", "mean", "ci_low", "ci_high", "half_width", "interval"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its 95 % interval [low, high] (None: no interval; ``kind`` says which)."""

    mean: float
    n: int
    low: float | None = None
    high: float | None = None
    kind: str | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float]) -> Interval:
    """Student-t interval of the mean of n ≥ 2 values."""
    from scipy.stats import t  # scipy only when a board has several seeds

    data = np.asarray(values, dtype=float)
    n, mean = len(data), float(data.mean())
    half = float(t.ppf(0.5 + LEVEL / 2, n - 1)) * float(data.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, n, mean - half, mean + half, T_SEEDS)


def bootstrap_counts(values: Sequence[float], counts: Sequence[int]) -> tuple[float, float]:
    """Percentile interval of the mean of N = sum(counts) samples, ``counts[k]`` of them equal to ``values[k]``,
    resampled with replacement ``RESAMPLES`` times."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    draws = np.random.default_rng(BOOTSTRAP_SEED).multinomial(total, counts / total, size=RESAMPLES)
    means = draws @ np.asarray(values, dtype=float) / total
    low, high = np.quantile(means, [0.5 - LEVEL / 2, 0.5 + LEVEL / 2])
    return float(low), float(high)


def bootstrap_mean(samples: np.ndarray) -> Interval:
    """The mean of per-sample values with its bootstrap interval over the samples (n = 1 seed)."""
    values, counts = np.unique(np.asarray(samples, dtype=float), return_counts=True)
    low, high = bootstrap_counts(values, counts)
    return Interval(float(np.mean(samples)), 1, low, high, BOOTSTRAP)


def proportion_interval(proportion: float, samples: int) -> Interval:
    """An accuracy measured on ``samples`` test samples (n = 1 seed), with its bootstrap interval over them."""
    right = round(proportion * samples)
    low, high = bootstrap_counts([0.0, 1.0], [samples - right, right])
    return Interval(proportion, 1, low, high, BOOTSTRAP)


def mean_interval(values: Sequence[float | None], samples: Sequence[int | None] | None = None) -> Interval:
    """The mean over seeds and its interval: Student-t for n ≥ 2; for one seed a bootstrap over its test
    samples when ``values`` are accuracies measured on ``samples[0]`` of them, else no interval. A missing
    value (a seed without a number) gives a NaN mean."""
    data = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
    if not data or None in data:
        return Interval(math.nan, len(data))
    if len(data) >= 2:
        return t_interval(data)
    size = samples[0] if samples else None
    if size is None or (isinstance(size, float) and math.isnan(size)) or int(size) <= 0:
        return Interval(data[0], 1)
    return proportion_interval(data[0], int(size))


def _row(key: tuple, keys: list[str], interval: Interval) -> dict:
    return {**dict(zip(keys, key, strict=True)), "n": interval.n, "mean": interval.mean, "ci_low": interval.low,
            "ci_high": interval.high, "half_width": interval.half_width, "interval": interval.kind}


def aggregate(frame: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """Per (dataset, backbone, method, budget, φ): n seeds, the mean of ``metric``, its 95 % interval
    (``ci_low``, ``ci_high``, ``half_width``) and which interval (``interval``). One-seed bootstraps apply to
    the test accuracy only (a proportion of ``test_size`` samples); other metrics get no interval then."""
    rows = []
    for key, group in frame.groupby(KEYS, sort=False, dropna=False):
        samples = group["test_size"].tolist() if metric == "test_accuracy" else None
        rows.append(_row(key, KEYS, mean_interval(group[metric].tolist(), samples)))
    return pd.DataFrame(rows, columns=[*KEYS, *INTERVAL_COLUMNS])


def _paired_one_seed(pair: pd.Series, metric: str) -> Interval:
    """Method − reference on one seed: a paired bootstrap over the test samples when both stored their
    per-sample correctness on the same samples, else the difference alone."""
    difference = float(pair[metric] - pair[f"{metric}_ref"])
    bits, reference = pair.get(OUTCOMES), pair.get(f"{OUTCOMES}_ref")
    size = pair["test_size"]
    if (metric != "test_accuracy" or not isinstance(bits, str) or not isinstance(reference, str)
            or pd.isna(size) or size != pair["test_size_ref"]):
        return Interval(difference, 1)
    per_sample = unpack(bits, int(size)).astype(int) - unpack(reference, int(size)).astype(int)
    interval = bootstrap_mean(per_sample)
    return Interval(difference, 1, interval.low, interval.high, BOOTSTRAP)


def paired(frame: pd.DataFrame, reference: str, metric: str = "test_accuracy") -> pd.DataFrame:
    """Per (dataset, backbone, method, budget, φ) of every method but ``reference``: the mean paired difference
    method − reference over the seeds both have on the same base backbone, its 95 % interval, and whether
    that interval excludes zero. ``frame`` needs the ``test_correct`` column for one-seed bootstraps."""
    if OUTCOMES not in frame:
        frame = frame.assign(**{OUTCOMES: None})
    ours = frame[frame["method"] != reference]
    theirs = frame[frame["method"] == reference][[*PAIR_KEYS, metric, "test_size", OUTCOMES, "base_backbone_key"]]
    pairs = ours.merge(theirs, on=PAIR_KEYS, suffixes=("", "_ref"))
    same_base = (pairs["base_backbone_key"].isna() | pairs["base_backbone_key_ref"].isna()
                 | (pairs["base_backbone_key"] == pairs["base_backbone_key_ref"]))
    pairs = pairs[same_base.astype(bool)]
    rows = []
    for key, group in pairs.groupby(KEYS, sort=False, dropna=False):
        differences = (group[metric] - group[f"{metric}_ref"]).tolist()
        if any(pd.isna(d) for d in differences):
            interval = Interval(math.nan, len(differences))
        elif len(differences) >= 2:
            interval = t_interval(differences)
        else:
            interval = _paired_one_seed(group.iloc[0], metric)
        rows.append({**_row(key, KEYS, interval), "excludes_zero": interval.excludes_zero})
    return pd.DataFrame(rows, columns=[*KEYS, *INTERVAL_COLUMNS, "excludes_zero"])
