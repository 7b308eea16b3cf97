"""Detection metrics and the feature baselines, the same for every method a simulation compares.

Rules (DESIGN.md): per merchant, a chronological train / validation / test split; the threshold is
chosen on validation only (the F1-best one, as a researcher with validation labels would); no point
adjustment: every test session counts once. Recall at 1% FPR reads the test ROC curve itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def validation_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the best F1 on validation; with no attacks there, the 99th percentile."""
    if not labels.any():
        return float(np.quantile(scores, 0.99))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def detection_metrics(
    labels: np.ndarray, scores: np.ndarray, kinds: np.ndarray, threshold: float
) -> dict[str, Any]:
    """AUROC, AUPRC, recall at 1% FPR, F1 at the validation threshold, and recall per attack type."""
    labels = labels.astype(bool)
    flagged = scores >= threshold
    tp = int((flagged & labels).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "recall_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "per_attack_recall": {
            str(kind): float(flagged[kinds == kind].mean()) for kind in sorted(set(kinds[labels]))
        },
        "sessions": len(labels),
        "attacks": int(labels.sum()),
    }


def isolation_forest_scores(train: np.ndarray, *others: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    forest = IsolationForest(random_state=seed).fit(train)
    return [-forest.score_samples(x) for x in others]


def ecod_scores(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """ECOD (Li et al., 2022): per feature, how far into either tail of the training data's empirical
    distribution a session lies (the tail chosen by the feature's skewness), summed as -log probabilities."""
    n = len(train)
    ordered = np.sort(train, axis=0)
    centred = train - train.mean(0)
    skew = (centred**3).mean(0) / np.maximum(train.std(0), 1e-12) ** 3
    out = []
    for x in others:
        columns = range(x.shape[1])
        below = np.stack([np.searchsorted(ordered[:, j], x[:, j], side="right") for j in columns], 1)
        above = n - np.stack([np.searchsorted(ordered[:, j], x[:, j], side="left") for j in columns], 1)
        left = -np.log((below + 1) / (n + 1))
        right = -np.log((above + 1) / (n + 1))
        auto = np.where(skew < 0, left, right)
        out.append(np.maximum.reduce([left.sum(1), right.sum(1), auto.sum(1)]))
    return out
