"""The behaviour detector with a PyOD-style API: fit / decision_function / predict / explain.

Higher scores are more anomalous, as in PyOD, so one harness scores this detector and the classical
baselines alike. `fit` is a merchant's local, DP-trained fit: the adapter on the earlier sessions, the
session-score aggregation and the alert threshold on the later (validation) ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import average_precision_score

from fedanom.client.training import TrainReport, train_model
from fedanom.common.artifact import (
    Calibration,
    DetectorSpec,
    backbone_hash,
    load_backbone,
    load_detector,
    relative_or_absolute,
    resolve_backbone_path,
    save_detector,
)
from fedanom.common.errors import FedanomError
from fedanom.common.model import architecture_of, attach_lora, pick_device
from fedanom.common.privacy import PrivacyLedger
from fedanom.common.scoring import AGGREGATIONS, Surprise, aggregate, event_surprise, explain
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import LoraSettings, TrainSettings
from fedanom.common.tokens import Popularity
from fedanom.common.windows import Windows

# Chosen in benchmarks/detector.py on the seeded shop with injected bots: best or tied-best validation
# AUPRC of the four candidates and best test AUPRC for both architectures (BENCHMARKS.md). Used when a
# merchant has no labels to choose with.
DEFAULT_AGGREGATION = "mean"


class BehaviourDetector:
    def __init__(
        self,
        model: PeftModel,
        *,
        backbone_dir: Path,
        popularity: Popularity,
        lora: LoraSettings,
        session: SessionConfig,
        aggregation: str = DEFAULT_AGGREGATION,
        calibration: Calibration | None = None,
        provenance: dict[str, Any] | None = None,
        score_mix: dict[str, float] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.backbone_dir = backbone_dir
        self.popularity = popularity
        self.lora = lora
        self.session = session
        self.aggregation = aggregation
        self.calibration = calibration
        self.provenance = provenance or {}
        self.score_mix = score_mix
        self.device = device

    @classmethod
    def from_backbone(
        cls,
        backbone_dir: str | Path,
        popularity: Popularity,
        *,
        lora: LoraSettings | None = None,
        session: SessionConfig | None = None,
        device: str | None = None,
    ) -> BehaviourDetector:
        """A fresh (untrained) adapter on a backbone directory; the model moves to its device first."""
        placed = pick_device(device)
        lora = lora or LoraSettings()
        model = attach_lora(load_backbone(backbone_dir, placed), lora)
        return cls(
            model,
            backbone_dir=Path(backbone_dir),
            popularity=popularity,
            lora=lora,
            session=session or SessionConfig(),
            device=placed,
        )

    # ------------------------------------------------------------------------------------------ PyOD API
    def fit(
        self,
        windows: Windows,
        labels: np.ndarray | None = None,
        *,
        train: TrainSettings | None = None,
        ledger: PrivacyLedger | None = None,
        alert_rate: float = 0.01,
        validation_fraction: float = 0.15,
    ) -> TrainReport:
        """Train on the earlier sessions, choose the aggregation and calibrate on the later ones.

        `labels` (optional, 1 = known attack) steer the aggregation choice and keep known attacks out of
        the threshold; with a supervised head (LoraSettings.supervised_head) they also train it.
        """
        train = train or TrainSettings()
        if labels is not None and len(labels) != windows.n_windows:
            raise ValueError("labels must have one entry per window")
        fit_part, val_part = windows.chronological_split(1.0 - validation_fraction, validation_fraction)
        if val_part.n_windows == 0 or fit_part.n_windows < 2:
            raise FedanomError(f"{windows.n_windows} sessions are too few to train and validate on")
        if train.dp and ledger is None:
            ledger = PrivacyLedger.open(None, epsilon_budget=8.0, delta=1.0 / fit_part.n_windows)
        fit_labels = _labels_for(fit_part, windows, labels) if self.lora.supervised_head else None
        report = train_model(
            self.model, fit_part, train, labels=fit_labels, ledger=ledger, device=self.device
        )
        self.calibrate(val_part, _labels_for(val_part, windows, labels), alert_rate)
        self.provenance.update(
            {
                "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sessions": report.sessions,
                "steps": report.steps,
                "dp": train.dp,
                "epsilon": report.epsilon_spent,
                "delta": report.delta,
                "noise_multiplier": report.noise_multiplier,
                "max_grad_norm": train.max_grad_norm if train.dp else None,
            }
        )
        return report

    def calibrate(self, validation: Windows, labels: np.ndarray | None, alert_rate: float = 0.01) -> Surprise:
        """Choose the score aggregation (by AUPRC, where labels show attacks) and the threshold at
        `alert_rate` of the normal validation sessions; returns the validation surprise it read. `fit`
        ends with it, a federated merchant calls it on the global adapter, and so does the simulation's
        untrained baseline."""
        surprise = event_surprise(self.model, validation, device=self.device)
        self.aggregation = self._choose_aggregation(surprise, validation, labels)
        normal = ~labels.astype(bool) if labels is not None else np.ones(validation.n_windows, bool)
        if surprise.head is not None:
            own = aggregate(surprise, validation, self.aggregation)[normal]
            head = surprise.head[normal]
            self.score_mix = {
                "self_mean": float(own.mean()),
                "self_std": float(own.std() or 1.0),
                "head_mean": float(head.mean()),
                "head_std": float(head.std() or 1.0),
            }
        self.calibration = Calibration.from_scores(self.combine(surprise, validation)[normal], alert_rate)
        return surprise

    def decision_function(self, windows: Windows) -> np.ndarray:
        """Anomaly score per window (higher = more anomalous)."""
        return self.combine(self.surprise(windows), windows)

    def combine(self, surprise: Surprise, windows: Windows) -> np.ndarray:
        """The score from the model's outputs: the aggregated surprise, plus the head when trained."""
        own = aggregate(surprise, windows, self.aggregation)
        mix = self.score_mix
        if mix is None or surprise.head is None:
            return own
        return (own - mix["self_mean"]) / mix["self_std"] + (surprise.head - mix["head_mean"]) / mix[
            "head_std"
        ]

    def predict(self, windows: Windows, alert_rate: float | None = None) -> np.ndarray:
        """1 where the score passes the calibrated threshold (at the calibrated or a given alert rate)."""
        return (self.decision_function(windows) > self.threshold(alert_rate)).astype(np.int8)

    def explain(self, windows: Windows, i: int, k: int = 3) -> list[str]:
        """The k most surprising events of window i, in plain words."""
        one = windows.select(np.array([i]))
        return explain(self.surprise(one), one, 0, k)

    def surprise(self, windows: Windows) -> Surprise:
        return event_surprise(self.model, windows, device=self.device)

    def threshold(self, alert_rate: float | None = None) -> float:
        if self.calibration is None:
            raise FedanomError("the detector is not calibrated: fit it first")
        return self.calibration.threshold(alert_rate)

    def _choose_aggregation(self, surprise: Surprise, windows: Windows, labels: np.ndarray | None) -> str:
        if labels is None or labels.min() == labels.max():
            return DEFAULT_AGGREGATION
        scores = {
            how: average_precision_score(labels, aggregate(surprise, windows, how)) for how in AGGREGATIONS
        }
        return max(scores, key=lambda how: scores[how])

    # --------------------------------------------------------------------------------------------- disk
    def save(self, directory: str | Path) -> None:
        if self.calibration is None:
            raise FedanomError("the detector is not calibrated: fit it first")
        directory = Path(directory)
        spec = DetectorSpec(
            backbone={
                "hash": backbone_hash(self.backbone_dir),
                "path": relative_or_absolute(self.backbone_dir, directory),
                "architecture": architecture_of(self.model.get_base_model()),
            },
            lora=self.lora.to_dict(),
            session=asdict(self.session),
            aggregation=self.aggregation,
            calibration=self.calibration,
            provenance=self.provenance,
            score_mix=self.score_mix,
        )
        save_detector(directory, self.model, spec, self.popularity)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> BehaviourDetector:
        placed = pick_device(device)
        model, spec, popularity = load_detector(directory, placed)
        lora = spec.lora
        return cls(
            model,
            backbone_dir=resolve_backbone_path(Path(directory), spec),
            popularity=popularity,
            lora=LoraSettings(**{**lora, "targets": tuple(lora["targets"])}),
            session=SessionConfig(**spec.session),
            aggregation=spec.aggregation,
            calibration=spec.calibration,
            provenance=spec.provenance,
            score_mix=spec.score_mix,
            device=placed,
        )


def _labels_for(part: Windows, whole: Windows, labels: np.ndarray | None) -> np.ndarray | None:
    """The labels of `part`'s windows, matched by (session, window index)."""
    if labels is None:
        return None
    index = {(s, int(w)): i for i, (s, w) in enumerate(zip(whole.session, whole.window_index, strict=True))}
    return np.array(
        [labels[index[(s, int(w))]] for s, w in zip(part.session, part.window_index, strict=True)]
    )
