"""The shop's feature reference: how unusual a session's features are among this shop's own normal sessions.

Two parts, both fit on the merchant's normal training sessions and kept in its detector; like item
popularity they describe one shop and never leave the merchant:

- an isolation forest (Liu et al., 2008; scikit-learn's) over the session features scores them. It sees
  combinations (many items in little time, carts without views) that no single feature's tail shows.
  In place of ECOD's per-feature tail sum, on five real exports with injected bots (a merchant that knows
  none of them, one DP fit per export and seed, seeds 0-2) it took the detector's mean test AUPRC from
  0.534 to 0.669 on DIGINETICA and from 0.289 to 0.465 on YOOCHOOSE, +0.006 to +0.027 on Taobao and
  TalkingData, -0.011 on REES46 (whose AUROC rose 0.965 to 0.974) (BENCHMARKS.md, session 13);
- quantiles of each feature put the explanation into words ("events_per_min 61, higher than 99.9% of this
  shop's sessions").

The forest's trees travel as a skops file, which loads only the types named here, so a planted file
cannot run code the way a pickle can; loading then checks that every tree's nodes stay inside it.

Scoring reads each tree's leaf for a session and adds up the leaves' path lengths, tabled once from the
trees' public structure (Liu et al.'s formula, as scikit-learn computes it; a test holds the two equal).
scikit-learn's `score_samples` costs about 0.15 ms per tree per call whatever the number of sessions,
16 ms for the forest's hundred trees: the most of a live event's answer (`fedanom serve`,
BENCHMARKS.md); the table takes one `apply` per tree.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest

from fedanom.common.errors import FedanomError
from fedanom.common.features import FEATURE_NAMES

QUANTILES = 1001  # a shop's reference keeps this many quantiles of each feature, not its sessions
FOREST_TYPES = ["sklearn.tree._tree.Tree"]  # beyond skops' own trusted defaults: the forest's trees


class FeatureReference:
    """The isolation forest that scores a session's features and the quantiles that explain them."""

    def __init__(self, quantiles: np.ndarray, forest: IsolationForest) -> None:
        self.quantiles = quantiles  # float64 [QUANTILES, n_features], ascending per column
        self.forest = forest
        self.path_lengths = [_leaf_path_lengths(tree.tree_) for tree in forest.estimators_]
        self.normaliser = len(forest.estimators_) * float(
            _average_path_length(np.array([forest.max_samples_]))[0]
        )

    @classmethod
    def fit(cls, features: np.ndarray, seed: int = 0) -> FeatureReference:
        if len(features) == 0:
            raise FedanomError("no normal training sessions to fit the shop's feature reference on")
        grid = np.linspace(0.0, 1.0, QUANTILES)
        forest = IsolationForest(random_state=seed).fit(features.astype(np.float32))
        return cls(np.quantile(features.astype(np.float64), grid, axis=0), forest)

    def surprise(self, features: np.ndarray) -> np.ndarray:
        """Feature surprise per session: the forest's anomaly score (higher = more unusual for this shop;
        about 0.5 for a typical session, towards 1 for one that is isolated in a few splits): what
        `-forest.score_samples` gives, with every tree's leaf path lengths tabled."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        depth = np.zeros(len(x))
        for tree, lengths in zip(self.forest.estimators_, self.path_lengths, strict=True):
            depth += lengths[tree.tree_.apply(x)]
        if self.normaliser == 0:  # a forest of one-sample trees knows nothing: scikit-learn's 0.5
            return np.full(len(x), 0.5)
        return np.power(2.0, -depth / self.normaliser)

    def tails(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-log P(value <= x) and -log P(value >= x) of every feature of every session ([n, n_features])."""
        q, n = self.quantiles, len(self.quantiles)
        columns = range(q.shape[1])
        at_most = np.stack([np.searchsorted(q[:, j], features[:, j], "right") for j in columns], 1)
        at_least = n - np.stack([np.searchsorted(q[:, j], features[:, j], "left") for j in columns], 1)
        return -np.log((at_most + 1) / (n + 1)), -np.log((at_least + 1) / (n + 1))

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

    def save(self, directory: Path) -> None:
        """`reference.npz` (the quantiles) and `forest.skops` (the isolation forest) in `directory`."""
        import skops.io  # about a second of sklearn imports: only where a detector is written or read

        np.savez_compressed(directory / "reference.npz", quantiles=self.quantiles)
        skops.io.dump(self.forest, directory / "forest.skops", compression=zipfile.ZIP_DEFLATED)

    @classmethod
    def load(cls, directory: Path) -> FeatureReference:
        import skops.io

        path = directory / "forest.skops"
        try:
            forest = skops.io.load(path, trusted=FOREST_TYPES)
        except Exception as exc:  # skops names what it refused; any failure means the file is not ours
            raise FedanomError(f"{path} is not an isolation forest fedanom wrote ({exc})") from None
        problem = _problem_with(forest)
        if problem:
            raise FedanomError(f"{path} is not an isolation forest fedanom wrote: {problem}")
        with np.load(directory / "reference.npz") as data:
            quantiles = data["quantiles"]
        if quantiles.shape != (QUANTILES, len(FEATURE_NAMES)):
            raise FedanomError(f"{directory / 'reference.npz'} holds {quantiles.shape} quantiles, not ours")
        return cls(quantiles, forest)


def _leaf_path_lengths(tree: Any) -> np.ndarray:
    """Per node: its depth (the root's 0) plus the average path length of the samples it held (used at
    the leaves). scikit-learn's depths count the root as 1."""
    depth = np.asarray(tree.compute_node_depths(), dtype=np.float64) - 1.0
    return depth + _average_path_length(tree.n_node_samples.astype(np.float64))


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary tree of n samples."""
    out = np.where(n == 2, 1.0, 0.0)
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _problem_with(forest: object) -> str | None:
    """What makes a loaded object unfit to score: another type, another feature count, or a tree whose
    nodes point outside it (skops checks the arrays' types and shapes, not where their indices lead)."""
    if not isinstance(forest, IsolationForest):
        return f"it holds a {type(forest).__name__}"
    if getattr(forest, "n_features_in_", None) != len(FEATURE_NAMES):
        return (
            f"it was fitted on {getattr(forest, 'n_features_in_', 'no')} features, not {len(FEATURE_NAMES)}"
        )
    for features in getattr(forest, "estimators_features_", []):
        if len(features) != len(FEATURE_NAMES):  # each tree would read its own subset of the columns
            return f"a tree reads {len(features)} of the {len(FEATURE_NAMES)} features"
    for tree in getattr(forest, "estimators_", []):
        nodes = tree.tree_
        children = np.concatenate([nodes.children_left, nodes.children_right])
        if children.min() < -1 or children.max() >= nodes.node_count:
            return "a tree's node points outside the tree"
        if nodes.feature.min() < -2 or nodes.feature.max() >= len(FEATURE_NAMES):
            return "a tree splits on a feature that does not exist"
        ids = np.arange(nodes.node_count)
        for children in (nodes.children_left, nodes.children_right):
            if np.any((children != -1) & (children <= ids)):  # a loop, or a path the table cannot follow
                return "a tree's node points back to itself or above"
    return None
