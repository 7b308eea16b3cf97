"""The behaviour detector with a PyOD-style API: fit / decision_function / predict / explain.

Higher scores are more anomalous, as in PyOD, so one harness scores this detector and the classical
baselines alike. `fit` is a merchant's local, DP-trained fit: the adapter on the earlier sessions, the
session-score aggregation and the alert threshold on the later (validation) ones.

A session's score adds up to three kinds of evidence, each standardised on the merchant's normal
validation sessions so that none drowns the others: the sequence model's surprise (context and events),
the shop's feature reference (an isolation forest over its normal sessions' features), and the federated
anomaly head where the federation trains one. The sequence model sees order and context, the reference
sees rates and their combinations directly. Which one wins depends on the shop (on REES46 the features,
on the click-only YOOCHOOSE and DIGINETICA the sequence); together they beat both feature baselines'
AUPRC on all three (BENCHMARKS.md, sessions 7 and 13). A merchant whose validation sessions hold enough
known attacks sums only the kinds that rank them best there, as it chooses the event aggregation.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedanom.common.backbone import backbone_hash
from fedanom.common.detector.artifact import (
    Calibration,
    DetectorSpec,
    load_backbone,
    load_detector,
    relative_or_absolute,
    resolve_backbone_path,
    save_detector,
)
from fedanom.common.detector.evidence import (
    MIN_KNOWN_TO_CHOOSE,
    auprc_with_and_without_head,
    choose_kinds,
    scales,
)
from fedanom.common.detector.model import architecture_of, attach_lora, lora_targets_of, pick_device
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.reference import FeatureReference
from fedanom.common.detector.scoring import (
    DEFAULT_AGGREGATION,
    Surprise,
    aggregate,
    choose_aggregation,
    event_surprise,
    explain,
)
from fedanom.common.detector.training import TrainReport, privacy_units, train_model
from fedanom.common.errors import FedanomError
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import ALERT_RATE, EPSILON, LoraSettings, TrainSettings
from fedanom.common.tokens import Popularity
from fedanom.common.windows import VALIDATION_FRACTION, Windows


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
        reference: FeatureReference | None = None,
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
        self.reference = reference
        self.device = device
        self.report: TrainReport | None = None  # the last `fit`'s training run

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
        alert_rate: float = ALERT_RATE,
        validation_fraction: float = VALIDATION_FRACTION,
    ) -> BehaviourDetector:
        """Train on the earlier sessions, choose the aggregation and calibrate on the later ones; the
        training run's report stays in `self.report`, and the detector is returned, as PyOD's are.

        `labels` (optional, 1 = known attack) keep known attacks out of what the sequence model learns,
        out of the feature reference and out of the threshold, and steer the aggregation choice; with a
        supervised head (LoraSettings.supervised_head) they also train it.
        """
        train = train or TrainSettings()
        if labels is not None and len(labels) != windows.n_windows:
            raise ValueError("labels must have one entry per window")
        fit_part, val_part = windows.holdout(validation_fraction)
        if val_part.n_windows == 0 or fit_part.n_windows < 2:
            sessions = len(set(windows.session))
            raise FedanomError(
                f"{sessions} session{'s' * (sessions != 1)} ({windows.n_windows} windows of up to "
                f"{self.session.window} events) are too few to train and validate on: both need "
                "sessions of their own"
            )
        if train.dp and ledger is None:
            units = privacy_units(fit_part, train)
            ledger = PrivacyLedger.open(
                None, epsilon_budget=EPSILON, delta=1.0 / units, unit=train.privacy_unit
            )
        fit_labels = windows.labels_of(fit_part, labels)
        report = train_model(
            self.model, fit_part, train, labels=fit_labels, ledger=ledger, device=self.device
        )
        fit_normal = fit_part if fit_labels is None else fit_part.select(fit_labels == 0)
        self.calibrate(
            val_part,
            windows.labels_of(val_part, labels),
            alert_rate,
            training=fit_normal,
            score_head=self.head_helps(fit_part, fit_labels, fit_normal) is not False,
        )
        self.provenance.update(
            {
                "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sessions": report.sessions,
                "steps": report.steps,
                "dp": train.dp,
                "noise": report.noise,
                "epsilon": report.epsilon_spent,
                "delta": report.delta,
                "noise_multiplier": report.noise_multiplier,
                "max_grad_norm": train.max_grad_norm if train.dp else None,
            }
        )
        self.report = report
        return self

    def calibrate(
        self,
        validation: Windows,
        labels: np.ndarray | None,
        alert_rate: float = ALERT_RATE,
        *,
        training: Windows,
        score_head: bool = True,
    ) -> Surprise:
        """Fit the shop's feature reference on its normal training sessions (`training`, known attacks
        left out by the caller); on the validation ones choose the
        event aggregation (by AUPRC, where labels show attacks), scale each kind of evidence and
        set the threshold at `alert_rate` of the normal sessions. Returns the validation surprise it read.
        `fit` ends with it, a federated merchant calls it on the global adapter (`score_head`: the
        federation's word on the head, for a merchant whose labels cannot choose the kinds), and so does
        the simulation's untrained baseline."""
        normal = ~labels.astype(bool) if labels is not None else np.ones(validation.n_windows, bool)
        if not normal.any():
            raise FedanomError("no normal validation sessions to calibrate the threshold on")
        self.reference = FeatureReference.fit(training.features, seed=self.lora.seed)
        surprise = event_surprise(self.model, validation, device=self.device)
        self.aggregation = choose_aggregation(surprise, validation, labels)
        evidence = self.evidence(surprise, validation)
        scaled = scales(evidence, normal)
        self.score_mix = {}
        for name in choose_kinds(evidence, labels, scaled, score_head):
            self.score_mix[f"{name}_median"], self.score_mix[f"{name}_scale"] = scaled[name]
        self.calibration = Calibration.from_scores(self.combine(surprise, validation)[normal], alert_rate)
        return surprise

    def decision_function(self, windows: Windows) -> np.ndarray:
        """Anomaly score per window (higher = more anomalous)."""
        return self.combine(self.surprise(windows), windows)

    def combine(self, surprise: Surprise, windows: Windows) -> np.ndarray:
        """The score from the model's outputs and the session features: each kind of evidence measured
        from the median of the merchant's normal validation sessions, in units of the distance from
        that median to their 99th percentile (1 = as unusual as the top 1% of normal sessions), summed.
        That unit follows each kind's own tail, so a heavy-tailed kind cannot drown the others."""
        mix = self.score_mix
        if mix is None:
            raise FedanomError("the detector is not calibrated: fit it first")
        score = np.zeros(windows.n_windows)
        for name, values in self.evidence(surprise, windows).items():
            if f"{name}_scale" in mix:  # a kind that labels chose to leave out has no scale
                score += (values - mix[f"{name}_median"]) / mix[f"{name}_scale"]
        return score

    def kinds(self) -> list[str]:
        """The kinds of evidence the calibrated score sums (sequence, features, head)."""
        return [key.removesuffix("_scale") for key in self.score_mix or {} if key.endswith("_scale")]

    def evidence(self, surprise: Surprise, windows: Windows) -> dict[str, np.ndarray]:
        """Each kind of evidence about each window, unscaled: sequence, features, head (where present)."""
        evidence = {"sequence": aggregate(surprise, windows, self.aggregation)}
        if self.reference is not None:
            evidence["features"] = self.reference.surprise(windows.features)
        if surprise.head is not None:
            evidence["head"] = surprise.head.astype(np.float64)
        return evidence

    def predict(self, windows: Windows, alert_rate: float | None = None) -> np.ndarray:
        """1 where the score passes the calibrated threshold (at the calibrated or a given alert rate)."""
        return (self.decision_function(windows) > self.threshold(alert_rate)).astype(np.int8)

    def explain(self, windows: Windows, i: int, k: int = 3) -> list[str]:
        """The k most surprising things about window i, in plain words."""
        one = windows.select(np.array([i]))
        return explain(self.surprise(one), one, 0, k, self.reference)

    def surprise(self, windows: Windows) -> Surprise:
        return event_surprise(self.model, windows, device=self.device)

    def threshold(self, alert_rate: float | None = None) -> float:
        return self._calibrated().threshold(alert_rate)

    def alert_rate(self, asked: float | None = None) -> float:
        """The alert rate in force: the one asked for, else the one the detector was calibrated at."""
        return self._calibrated().alert_rate if asked is None else asked

    def _calibrated(self) -> Calibration:
        if self.calibration is None:
            raise FedanomError("the detector is not calibrated: fit it first")
        return self.calibration

    def head_auprc(
        self, surprise: Surprise, validation: Windows, labels: np.ndarray | None
    ) -> tuple[float, float] | None:
        """Validation AUPRC of the unsupervised kinds summed, with and without the anomaly head (None
        without a head or without labels of both kinds). A federation weighs these from its labelled
        merchants to decide the head for those whose own labels are too few to choose."""
        evidence = self.evidence(surprise, validation)
        if "head" not in evidence or labels is None or labels.min() == labels.max():
            return None
        return auprc_with_and_without_head(evidence, labels)

    def head_helps(self, fit_part: Windows, labels: np.ndarray | None, normal: Windows) -> bool | None:
        """Whether the head ranks the training period's known attacks better summed than left out; None
        without a head or when fewer than MIN_KNOWN_TO_CHOOSE of them can tell. Trained under DP on a few
        dozen attacks, it did not on any of 9 REES46 merchants, and their test AUPRC agreed (BENCHMARKS.md,
        session 9); validation rarely holds enough known attacks to check it."""
        no_head = not self.lora.supervised_head  # nothing to check: spare the pass over the training period
        if no_head or labels is None or labels.sum() < MIN_KNOWN_TO_CHOOSE or labels.all():
            return None
        self.reference = FeatureReference.fit(normal.features, seed=self.lora.seed)  # calibrate fits it again
        check = self.head_auprc(self.surprise(fit_part), fit_part, labels)
        return check is None or check[0] >= check[1]

    # --------------------------------------------------------------------------------------------- disk
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        spec = DetectorSpec(
            backbone={
                "hash": backbone_hash(self.backbone_dir),
                "path": relative_or_absolute(self.backbone_dir, directory),
                "architecture": architecture_of(self.model.get_base_model()),
            },
            lora={**self.lora.to_dict(), "targets": list(lora_targets_of(self.model))},  # as resolved
            session=asdict(self.session),
            aggregation=self.aggregation,
            calibration=self._calibrated(),
            provenance=self.provenance,
            score_mix=self.score_mix,
        )
        if self.reference is None:
            raise FedanomError("the detector has no feature reference: fit it first")
        save_detector(directory, self.model, spec, self.popularity, self.reference)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> BehaviourDetector:
        placed = pick_device(device)
        model, spec, popularity, reference = load_detector(directory, placed)
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
            reference=reference,
            device=placed,
        )
