"""Per-window session features: the detector's feature reference and context tokens read them, and so do
the classical baselines (IsolationForest, ECOD).

They are computed from the same `SessionBatch` the model tokenizes, so every detector scores exactly the
same units. Rate, regularity, funnel and diversity features are the usual bot signals; the attack
injectors ship human-mimicking variants precisely so that these alone cannot win.
"""

from __future__ import annotations

from pathlib import Path

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


REFERENCE_QUANTILES = 1001  # a shop's reference keeps this many quantiles of each feature, not its sessions


class FeatureReference:
    """How far into the tails of this shop's own sessions a session's features lie.

    The statistic is ECOD's (Li et al., 2022): per feature, the empirical probability of a value at least
    this low (left) and at least this high (right); a session's feature surprise is the larger of the two
    tails' sums of -log probability, in nats like the model's event surprise. It is computed against
    quantiles of the merchant's normal training sessions kept in its detector, so a session's features
    are not ranked against the rest of the scored batch (PyOD's ECOD ranks each batch together with its
    training data; only `frac_rare_items` here moves with the scored file, through item popularity).
    Like item popularity it describes one shop and never leaves the merchant. It sees what rate features see
    directly (60 events a minute), where the sequence model sees order and context."""

    def __init__(self, quantiles: np.ndarray) -> None:
        self.quantiles = quantiles  # float64 [REFERENCE_QUANTILES, n_features], ascending per column

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureReference:
        grid = np.linspace(0.0, 1.0, REFERENCE_QUANTILES)
        return cls(np.quantile(features.astype(np.float64), grid, axis=0))

    def tails(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-log P(value <= x) and -log P(value >= x) of every feature of every session ([n, n_features])."""
        q, n = self.quantiles, len(self.quantiles)
        columns = range(q.shape[1])
        at_most = np.stack([np.searchsorted(q[:, j], features[:, j], "right") for j in columns], 1)
        at_least = n - np.stack([np.searchsorted(q[:, j], features[:, j], "left") for j in columns], 1)
        return -np.log((at_most + 1) / (n + 1)), -np.log((at_least + 1) / (n + 1))

    def surprise(self, features: np.ndarray) -> np.ndarray:
        """Feature surprise per session (nats, higher = more unusual for this shop)."""
        low, high = self.tails(features)
        return np.maximum(low.sum(1), high.sum(1))

    def describe(self, features: np.ndarray) -> list[tuple[float, str]]:
        """(nats, words) for every feature of one session ([n_features]), on its more unusual side."""
        low, high = (side[0] for side in self.tails(features[None, :]))
        out = []
        for j, name in enumerate(FEATURE_NAMES):
            higher = high[j] >= low[j]
            nats = float(high[j] if higher else low[j])
            share = 1.0 - float(np.exp(-nats))
            side = "higher" if higher else "lower"
            out.append((nats, f"{name} {features[j]:.3g}, {side} than {share:.1%} of this shop's sessions"))
        return out

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, quantiles=self.quantiles)

    @classmethod
    def load(cls, path: str | Path) -> FeatureReference:
        with np.load(path) as data:
            return cls(data["quantiles"])
