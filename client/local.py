"""`fedanom train`: a merchant fits a detector on its own export, with DP, and saves it.

The same `BehaviourDetector.fit` a federation's merchant runs, on one machine: the adapter trained
under the merchant's privacy ledger (its budget spent for good), then the threshold calibrated on
held-out normal sessions at the alert rate asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.training import privacy_units
from fedanom.common.ingest import Ingested
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import LoraSettings, TrainSettings
from fedanom.common.windows import Windows


def train_detector(
    ingested: Ingested,
    windows: Windows,
    known: np.ndarray | None,
    *,
    name: str,
    base: Path,
    out: Path,
    lora: LoraSettings,
    train: TrainSettings,
    session: SessionConfig,
    epsilon: float,
    delta: float | None,
    state_dir: Path,
    alert_rate: float,
    device: str | None,
    say: Callable[[str], None],
) -> str:
    """Fit, calibrate and save a detector on an export's windows (`known`: its labelled attacks, which
    train the anomaly head); a line saying what it learned and spent."""
    detector = BehaviourDetector.from_backbone(
        base,
        ingested.popularity,
        lora=replace(lora, supervised_head=known is not None),
        session=session,
        device=device,
    )
    ledger = None
    if train.dp:
        units = privacy_units(windows, train)
        ledger = PrivacyLedger.open(
            state_dir, epsilon_budget=epsilon, delta=delta or 1.0 / units, unit=train.privacy_unit
        )
    say(f"training on {windows.n_windows:,} sessions ({ingested.report.rows_kept:,} events) of {name}")
    report = detector.fit(windows, known, train=train, ledger=ledger, alert_rate=alert_rate).report
    assert report is not None  # fit leaves its training run's report
    detector.provenance["data"] = name
    detector.save(out)
    privacy = "no differential privacy"
    if report.epsilon_spent is not None:
        privacy = f"ε={report.epsilon_spent:.2f} of {epsilon:g} spent (δ={report.delta:.2g})"
    return (
        f"detector written to {out}: {report.steps} steps, loss {report.mean_loss:.3f}, {privacy}; "
        f"score sums {' + '.join(detector.kinds())} ({detector.aggregation} event surprise), "
        f"threshold {detector.threshold():.3f} at {alert_rate:.1%} alerts"
    )
