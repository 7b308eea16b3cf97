"""Server-side aggregation: malformed or outsized updates are rejected, never averaged."""

from __future__ import annotations

import numpy as np
import pytest

from fedanom.server.aggregation import AGGREGATORS, Update, aggregate

REFERENCE = {"b1": np.zeros((4, 2), dtype=np.float32), "b2": np.zeros(3, dtype=np.float32)}


def update(node: int, value: float, examples: int = 10) -> Update:
    return Update(node, {k: np.full_like(v, value) for k, v in REFERENCE.items()}, examples)


def test_fedavg_weights_by_examples_exactly() -> None:
    merged, rejected = aggregate([update(1, 1.0, 10), update(2, 4.0, 30)], REFERENCE)
    assert rejected == []
    assert merged is not None
    np.testing.assert_allclose(merged["b1"], 3.25)  # (1*10 + 4*30) / 40
    assert merged["b1"].dtype == np.float32


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (
            Update(9, {"b1": np.full((4, 2), np.nan, np.float32), "b2": np.zeros(3, np.float32)}, 10),
            "non-finite",
        ),
        (Update(9, {"b1": np.zeros((2, 4), np.float32), "b2": np.zeros(3, np.float32)}, 10), "shape"),
        (Update(9, {"b1": np.zeros((4, 2), np.float64), "b2": np.zeros(3, np.float32)}, 10), "dtype"),
        (Update(9, {"b1": np.zeros((4, 2), np.float32)}, 10), "tensors differ"),
        (update(9, 1e6), "above the bound"),
        (update(9, 1.0, examples=0), "training examples"),
    ],
)
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_bad_updates_are_rejected_and_the_global_stays_finite(
    broken: Update, reason: str, method: str
) -> None:
    honest = [update(1, 1.0), update(2, 1.2), update(3, 0.8)]
    merged, rejected = aggregate([*honest, broken], REFERENCE, method=method)
    assert [node for node, _ in rejected] == [9]
    assert reason in rejected[0][1]
    assert merged is not None
    for value in merged.values():
        assert np.isfinite(value).all()
        assert np.all((value >= 0.8) & (value <= 1.2))


def test_an_absolute_norm_bound_applies_even_to_few_updates() -> None:
    # change norms: sqrt(11) = 3.3 and 5 * sqrt(11) = 16.6
    merged, rejected = aggregate([update(1, 1.0), update(2, 5.0)], REFERENCE, norm_bound=5.0)
    assert [node for node, _ in rejected] == [2]
    assert merged is not None and np.allclose(merged["b2"], 1.0)


def test_nothing_valid_leaves_the_global_unchanged() -> None:
    merged, rejected = aggregate([update(1, np.inf)], REFERENCE)
    assert merged is None and len(rejected) == 1


def test_median_and_trimmed_mean_resist_one_outlier_within_the_bound() -> None:
    updates = [update(1, 1.0), update(2, 1.1), update(3, 0.9), update(4, 1.05), update(5, 3.0)]
    for method in ("median", "trimmed-mean"):
        merged, _ = aggregate(updates, REFERENCE, method=method, norm_bound=1e9)
        assert merged is not None and np.all(merged["b1"] < 1.2), method
