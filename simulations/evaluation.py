"""Detection metrics, the same for every method a simulation compares.

Rules (DESIGN.md): per merchant, a chronological train / validation / test split; the threshold is
chosen on validation only (the F1-best one, as a researcher with validation labels would); no point
adjustment: every test session counts once. Recall at 1% FPR reads the test ROC curve itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from fedanom.common.settings import ALERT_RATE


def validation_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the best F1 on validation; with no attacks there, the 99th percentile."""
    if not labels.any():
        return float(np.quantile(scores, 0.99))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def alert_threshold(labels: np.ndarray, scores: np.ndarray, alert_rate: float = ALERT_RATE) -> float:
    """The score above which `alert_rate` of the normal validation sessions lie: a merchant's alert level."""
    return float(np.quantile(scores[~labels.astype(bool)], 1.0 - alert_rate))


def detection_metrics(
    labels: np.ndarray, scores: np.ndarray, kinds: np.ndarray, threshold: float, alert_level: float
) -> dict[str, Any]:
    """AUROC, AUPRC, recall at 1% FPR, F1 at the validation threshold, the share of normal test sessions
    above the validation's 1% alert level (the false-alert rate a merchant would see), and per attack
    type: recall at the threshold, AUROC and recall at 1% FPR against the normal sessions."""
    labels = labels.astype(bool)
    flagged = scores >= threshold
    tp = int((flagged & labels).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    types = sorted(set(kinds[labels]))
    normal = scores[~labels]
    against_normal = {
        kind: (
            np.r_[np.zeros(len(normal)), np.ones(int((kinds == kind).sum()))],
            np.r_[normal, scores[kinds == kind]],
        )
        for kind in types
    }
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "recall_at_1pct_fpr": _recall_at_1pct_fpr(labels, scores),
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "false_alert_rate": float((normal > alert_level).mean()),
        "per_attack_recall": {str(kind): float(flagged[kinds == kind].mean()) for kind in types},
        "per_attack_auroc": {str(k): float(roc_auc_score(y, x)) for k, (y, x) in against_normal.items()},
        "per_attack_recall_at_1pct_fpr": {
            str(k): _recall_at_1pct_fpr(y, x) for k, (y, x) in against_normal.items()
        },
        "sessions": len(labels),
        "attacks": int(labels.sum()),
    }


def _recall_at_1pct_fpr(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.interp(0.01, fpr, tpr))
