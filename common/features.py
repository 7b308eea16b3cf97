"""Per-window session features: the detector's feature reference and context tokens read them, and so do
the classical baselines (IsolationForest, ECOD).

They are computed from the same `SessionBatch` the model tokenizes, so every detector scores exactly the
same units. Rate, regularity, funnel and diversity features are the usual bot signals; the attack
injectors ship human-mimicking variants precisely so that these alone cannot win.
"""

from __future__ import annotations

import numpy as np

from fedanom.common.events import EVENT_CODE, EVENT_TYPES
from fedanom.common.sessions import SessionBatch
from fedanom.common.tokens import Popularity

FEATURE_NAMES: tuple[str, ...] = (
    "n_events",
    "duration_s",
    "events_per_min",
    "gap_mean_s",
    "gap_std_s",
    "gap_cv",  # regularity: scripts tick like clocks
    "gap_min_s",
    "frac_gaps_under_1s",
    "unique_item_ratio",
    "consecutive_repeat_ratio",
    "n_categories",
    "category_entropy_bits",
    *(f"frac_{name}" for name in EVENT_TYPES),
    "cart_per_view",
    "purchase_per_view",
    "purchase_without_cart",
    "frac_rare_items",
)


def session_features(batch: SessionBatch, popularity: Popularity) -> np.ndarray:
    """float32 array [n_windows, len(FEATURE_NAMES)]; higher is not necessarily more anomalous."""
    starts = batch.offsets[:-1]
    n = batch.lengths.astype(np.float64)
    window_of = np.repeat(np.arange(batch.n_windows), batch.lengths)

    def per_window(values: np.ndarray) -> np.ndarray:
        return np.bincount(window_of, weights=values.astype(np.float64), minlength=batch.n_windows)

    duration = (batch.ts[batch.offsets[1:] - 1] - batch.ts[starts]) / 1000.0
    has_gap = batch.gap_ms >= 0
    gap_s = np.where(has_gap, batch.gap_ms / 1000.0, 0.0)
    n_gaps = per_window(has_gap)
    safe_gaps = np.maximum(n_gaps, 1)
    gap_mean = per_window(gap_s) / safe_gaps
    gap_var = np.maximum(per_window(gap_s**2) / safe_gaps - gap_mean**2, 0.0)
    gap_std = np.sqrt(gap_var)
    gap_min = np.full(batch.n_windows, np.inf)
    np.minimum.at(gap_min, window_of[has_gap], gap_s[has_gap])
    gap_min[n_gaps == 0] = 0.0

    prev_same = np.zeros(batch.n_events, dtype=bool)
    prev_same[1:] = (batch.item[1:] == batch.item[:-1]) & (window_of[1:] == window_of[:-1])
    unique_items = _distinct_per_window(batch.item, window_of, batch.n_windows)
    has_cat = batch.cat != 0
    n_categories = _distinct_per_window(batch.cat[has_cat], window_of[has_cat], batch.n_windows)

    counts = {name: per_window(batch.etype == code) for name, code in EVENT_CODE.items()}
    views = counts["view"] + counts["click"]
    rare = popularity.lookup(batch.item) <= 1

    columns = [
        n,
        duration,
        n / np.maximum(duration / 60.0, 1.0 / 60.0),
        gap_mean,
        gap_std,
        gap_std / np.maximum(gap_mean, 1e-3),
        gap_min,
        per_window(has_gap & (gap_s < 1.0)) / safe_gaps,
        unique_items / n,
        per_window(prev_same) / n,
        n_categories,
        _category_entropy(batch.cat[has_cat], window_of[has_cat], batch.n_windows),
        *(counts[name] / n for name in EVENT_TYPES),
        counts["cart"] / (views + 1.0),
        counts["purchase"] / (views + 1.0),
        ((counts["purchase"] > 0) & (counts["cart"] == 0)).astype(np.float64),
        per_window(rare) / n,
    ]
    return np.column_stack(columns).astype(np.float32)


def _window_value_counts(values: np.ndarray, window_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(window, count) for every distinct (window, value) pair."""
    key = values * np.uint64(0x9E3779B97F4A7C15) + window_of.astype(np.uint64)
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    return window_of[first], counts


def _distinct_per_window(values: np.ndarray, window_of: np.ndarray, n_windows: int) -> np.ndarray:
    windows, _ = _window_value_counts(values, window_of)
    return np.bincount(windows, minlength=n_windows).astype(np.float64)


def _category_entropy(cats: np.ndarray, window_of: np.ndarray, n_windows: int) -> np.ndarray:
    windows, counts = _window_value_counts(cats, window_of)
    totals = np.bincount(windows, weights=counts, minlength=n_windows)
    p = counts / np.maximum(totals[windows], 1)
    return np.bincount(windows, weights=-p * np.log2(p), minlength=n_windows)
