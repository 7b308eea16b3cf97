"""Aggregating merchants' adapter updates, each one checked before it can touch the global adapter.

An update must carry exactly the global adapter's tensors (names, shapes, dtypes), only finite values,
and a change from the global adapter whose L2 norm stays within a bound: an absolute one when the
operator sets it, otherwise ten times the median change of the round (a lone huge update cannot
hide behind itself). A rejected update is logged with its reason and left out; the round goes on
with the others.

Under FFA-LoRA only B is sent and A is the same everywhere, so the example-weighted mean of the B
matrices (FedAvg) is exactly the average of the merchants' adapters. Coordinate-wise trimmed mean and
median are there for federations that expect poisoned updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
MEDIAN_BOUND_FACTOR = 10.0
TRIM_FRACTION = 0.2


@dataclass
class Update:
    node: int
    arrays: Arrays
    examples: int


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


def _fedavg(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.tensordot(weights / weights.sum(), stack, axes=1)


def _trimmed_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    cut = int(TRIM_FRACTION * len(stack))
    ordered = np.sort(stack, axis=0)
    return ordered[cut : len(stack) - cut].mean(axis=0)


def _median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.median(stack, axis=0)


AGGREGATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "fedavg": _fedavg,
    "trimmed-mean": _trimmed_mean,
    "median": _median,
}


def aggregate(
    updates: list[Update], reference: Arrays, *, method: str = "fedavg", norm_bound: float | None = None
) -> tuple[Arrays | None, list[tuple[int, str]]]:
    """The new global adapter (None if no update survives) and the (node, reason) of each rejection."""
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation '{method}'; choose from {', '.join(AGGREGATORS)}")
    rejected: list[tuple[int, str]] = []
    valid = []
    for update in updates:
        reason = problem_with(update, reference)
        if reason is None:
            valid.append(update)
        else:
            rejected.append((update.node, reason))
    norms = {u.node: change_norm(u, reference) for u in valid}
    bound = norm_bound
    if bound is None and len(valid) >= 3:
        bound = MEDIAN_BOUND_FACTOR * float(np.median(list(norms.values())))
    if bound is not None:
        too_big = [u for u in valid if norms[u.node] > bound]
        rejected += [
            (u.node, f"its change has norm {norms[u.node]:.3g}, above the bound {bound:.3g}") for u in too_big
        ]
        valid = [u for u in valid if norms[u.node] <= bound]
    if not valid:
        return None, rejected
    weights = np.array([u.examples for u in valid], dtype=np.float64)
    combine = AGGREGATORS[method]
    merged = {
        name: combine(np.stack([u.arrays[name] for u in valid]).astype(np.float64), weights).astype(ref.dtype)
        for name, ref in reference.items()
    }
    return merged, rejected
