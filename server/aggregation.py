"""Aggregating merchants' adapter updates, each one checked before it can touch the global adapter.

An update must carry exactly the global adapter's tensors (names, shapes, dtypes), only finite values
and a positive example count, or it is rejected with its reason and left out; the round goes on with
the others.

No single merchant's update can then pull the global adapter further than a bound that does not depend
on the others being honest (a median-based bound lets a colluding majority through, and tiny colluding
updates can drag it below every honest one):

- **Its change is clipped to a fixed norm,** as DP-FedAvg clips client updates. The operator sets it
  (`norm-bound`), or it follows from the learning rate: Adam moves each value by about the learning
  rate per step, so under DP noise an honest update's change walks about `lr * sqrt(steps)` per value
  (measured 1-31 times the learning rate on the real exports, BENCHMARKS.md), and the default allows
  `DEFAULT_RMS_PER_LR` times the learning rate per value. That is about the size of a merchant's update
  with a few thousand sessions; a merchant with tens of thousands takes hundreds of steps a round,
  and its longer walk is mostly DP noise: unclipped, it swamped the average (on the five real shops the
  global adapter ranked attacks worse than the untrained one for three of the five). A change beyond
  `IMPLAUSIBLE` times the bound is no honest run's (Adam would need a million steps in a round to
  walk that far): it is rejected outright, so the round's log names it.
- **Its weight is capped** at `WEIGHT_CAP` times the lower median of the round's example counts, and
  at the others' weights together: claiming more sessions than it has wins a merchant at most half
  the average, and claiming fewer lowers its own weight and at most evens out the others'.

Under FFA-LoRA only B is sent and A is the same everywhere, so the weighted mean of the B matrices
(FedAvg) is exactly the average of the merchants' adapters. Coordinate-wise trimmed mean (at least the
largest and smallest value cut from three updates on) and median, both unweighted, are there for
federations that expect poisoned updates. Once the updates are checked, clipped and weighed, Flower's
own aggregation does the arithmetic of each (its FedAvg, FedTrimmedAvg and FedMedian strategies' helpers),
and its metric aggregation the weighted means of the merchants' metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

Arrays = dict[str, np.ndarray]
DEFAULT_RMS_PER_LR = 10.0
IMPLAUSIBLE = 100.0
WEIGHT_CAP = 10.0
TRIM_FRACTION = 0.2
WEIGHT = "weight"  # the metric Flower's aggregation weighs by: a merchant's capped example count


@dataclass
class Update:
    node: int
    arrays: Arrays
    examples: int


@dataclass
class Outcome:
    """What a round's aggregation did: the new global adapter (None if no update survived), and per
    merchant why it was rejected, how far it was clipped and the weight it got."""

    merged: Arrays | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    clipped: dict[int, float] = field(default_factory=dict)  # node: its change's norm before clipping
    weights: dict[int, float] = field(default_factory=dict)


def default_norm_bound(reference: Arrays, learning_rate: float) -> float:
    values = sum(v.size for v in reference.values())
    return DEFAULT_RMS_PER_LR * learning_rate * float(np.sqrt(values))


def problem_with(update: Update, reference: Arrays) -> str | None:
    """Why this update must not be averaged, or None when it is well formed."""
    if set(update.arrays) != set(reference):
        missing = sorted(set(reference) - set(update.arrays))[:3]
        extra = sorted(set(update.arrays) - set(reference))[:3]
        return f"tensors differ from the global adapter (missing {missing}, extra {extra})"
    for name, ref in reference.items():
        value = update.arrays[name]
        if value.shape != ref.shape:
            return f"{name} has shape {value.shape}, the global adapter {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{name} has dtype {value.dtype}, the global adapter {ref.dtype}"
        if not np.isfinite(value).all():
            return f"{name} holds non-finite values"
    if update.examples <= 0:
        return f"it reports {update.examples} training examples"
    return None


def change_norm(update: Update, reference: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum((update.arrays[k] - v) ** 2)) for k, v in reference.items())))


def _fedavg(changes: list[Arrays], weights: np.ndarray) -> Arrays:
    """Flower's weighted FedAvg (`aggregate_arrayrecords`, as its FedAvg strategy calls it)."""
    records = [
        RecordDict(
            {
                "changes": ArrayRecord({k: Array(v) for k, v in c.items()}),
                "weight": MetricRecord({WEIGHT: float(w)}),
            }
        )
        for c, w in zip(changes, weights, strict=True)
    ]
    return {name: array.numpy() for name, array in aggregate_arrayrecords(records, WEIGHT).items()}


def _trimmed_mean(changes: list[Arrays], weights: np.ndarray) -> Arrays:
    """Flower's FedTrimmedAvg arithmetic, cutting at least one update from each end from three on."""
    n = len(changes)
    cut = max(1, int(TRIM_FRACTION * n)) if n >= 3 else 0
    beta = (cut + 0.25) / n  # Flower cuts int(beta * n) from each end: exactly `cut`, and beta < 0.5
    return {name: trim_mean(np.stack([c[name] for c in changes]), beta) for name in changes[0]}


def _median(changes: list[Arrays], weights: np.ndarray) -> Arrays:
    """Flower's FedMedian arithmetic: the coordinate-wise median."""
    return {name: np.median(np.stack([c[name] for c in changes]), axis=0) for name in changes[0]}


AGGREGATORS: dict[str, Callable[[list[Arrays], np.ndarray], Arrays]] = {
    "fedavg": _fedavg,
    "trimmed-mean": _trimmed_mean,
    "median": _median,
}


def weighted_means(metrics: Sequence[Mapping[str, float]], weights: np.ndarray) -> dict[str, float]:
    """Flower's weighted metric mean (`aggregate_metricrecords`), with fedanom's capped weights."""
    records = [
        RecordDict({"metrics": MetricRecord({**m, WEIGHT: float(w)})})
        for m, w in zip(metrics, weights, strict=True)
    ]
    return {k: float(v) for k, v in aggregate_metricrecords(records, WEIGHT).items()}  # type: ignore[arg-type]


def capped_weights(examples: list[int]) -> np.ndarray:
    """Example counts capped at WEIGHT_CAP times their lower median (the smaller of two), then each at the
    sum of the others' (a lone merchant keeps its own)."""
    counts = np.array(examples, dtype=np.float64)
    lower_median = float(np.sort(counts)[(len(counts) - 1) // 2])
    capped = np.minimum(counts, WEIGHT_CAP * lower_median)
    others = capped.sum() - capped
    return np.minimum(capped, others) if len(capped) > 1 else capped


def aggregate(updates: list[Update], reference: Arrays, *, method: str, norm_bound: float) -> Outcome:
    """Check, clip, weigh and combine a round's updates."""
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation '{method}'; choose from {', '.join(AGGREGATORS)}")
    outcome = Outcome()
    valid, changes = [], []
    for update in updates:
        reason = problem_with(update, reference)
        norm = change_norm(update, reference) if reason is None else 0.0
        if reason is None and norm > IMPLAUSIBLE * norm_bound:
            reason = f"its change has norm {norm:.3g}, over {IMPLAUSIBLE:g} times the bound {norm_bound:.3g}"
        if reason is not None:
            outcome.rejected.append((update.node, reason))
            continue
        scale = 1.0
        if norm > norm_bound:
            outcome.clipped[update.node] = norm
            scale = norm_bound / norm
        valid.append(update)
        changes.append(
            {k: (update.arrays[k] - ref).astype(np.float64) * scale for k, ref in reference.items()}
        )
    if not valid:
        return outcome
    weights = capped_weights([u.examples for u in valid])
    outcome.weights = {u.node: float(w) for u, w in zip(valid, weights, strict=True)}
    combined = AGGREGATORS[method](changes, weights)
    outcome.merged = {name: (ref + combined[name]).astype(ref.dtype) for name, ref in reference.items()}
    return outcome
