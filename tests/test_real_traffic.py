"""The detector on real traffic (../shared/data): trained on an earlier period, scoring a later one.

Bots of every injected type are added to a real export, which is cut in time. A merchant that knows its
past attacks trains the tiny test backbone's adapter with DP on the earlier 80% of the events, as
`fedanom train --labels` does, and scores the rest as `fedanom score` does. The later period's normal
sessions must keep close to the 1% alert rate, new items and a changing catalogue included, and the bots
must be ranked at least as well as by PyOD's IsolationForest fitted on the same training sessions (on
REES46 within 0.01 of it: the ordering there does not hold in every seed).

Floors, from seeds 0-4 of this setup (BENCHMARKS.md, session 8):
- false alerts on later normal sessions: REES46 0.1-0.4%, YOOCHOOSE 0.5-1.4%. Before the scored file's
  items were counted into popularity, 49.9% on REES46; before the detector calibrated on sessions that
  had ended when the export did (`Windows.holdout`), 2.3-4.5%;
- AUROC: REES46 0.936-0.987 against IsolationForest's 0.940-0.983, ahead in 2 of 5 seeds and never
  more than 0.008 behind; YOOCHOOSE 0.880-0.935 against 0.753-0.850, ahead in every seed by 0.085 or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import TrainSettings
from fedanom.common.windows import Windows
from fedanom.simulations.attacks import ATTACKS, inject
from fedanom.simulations.baselines import BASELINES
from fedanom.simulations.real import real_shop
from fedanom.simulations.shop import write_taobao_csv

SAMPLES = {
    "rees46": "rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz",
    "yoochoose": "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.tsv.gz",
}
ALERT_RATE = 0.01
FALSE_ALERTS_FLOOR = 2 * ALERT_RATE  # the real-traffic issue's target
AUROC_FLOOR = {"rees46": 0.93, "yoochoose": 0.80}
BEHIND_FOREST = {"rees46": 0.01, "yoochoose": 0.0}  # how far below IsolationForest's AUROC is allowed
SEED = 0


@dataclass
class Later:
    detector: BehaviourDetector
    training: Windows
    windows: Windows  # the later period, as `fedanom score` reads it
    bots: np.ndarray  # per later window: an injected bot


def earlier_and_later(frame: pd.DataFrame, root: Path) -> tuple[Path, Path]:
    """The export cut in time: its earlier 80% of events to train on, the rest to score."""
    cut = np.quantile(frame.timestamp, 0.8)
    earlier = write_taobao_csv(frame[frame.timestamp < cut], root / "earlier.csv")
    return earlier, write_taobao_csv(frame[frame.timestamp >= cut], root / "later.csv")


@pytest.fixture(scope="module", params=list(SAMPLES))
def later(
    request: pytest.FixtureRequest,
    shared_data: Path,
    tiny_backbone: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Later]:
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    events = inject(real_shop(shared_data / SAMPLES[preset], preset), dict.fromkeys(ATTACKS, 8), seed=SEED)
    is_bot = dict(zip(events.user_id.astype(str), events.attack != "", strict=False))
    earlier, later_file = earlier_and_later(events, root)

    ingested = ingest(earlier, resolve_preset("taobao"))
    training = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    known = np.array([is_bot[user] for user in training.user], dtype=np.int8)
    detector = BehaviourDetector.from_backbone(tiny_backbone, ingested.popularity)
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / training.n_windows)
    settings = TrainSettings(epochs=2, seed=SEED)
    detector.fit(training, known, train=settings, ledger=ledger, alert_rate=ALERT_RATE)

    scored = ingest(later_file, resolve_preset("taobao"), popularity=detector.popularity)
    windows = Windows.from_batches(scored.batches(), scored.popularity, scored.report)
    bots = np.array([is_bot[user] for user in windows.user])
    return preset, Later(detector, training, windows, bots)


def test_the_alert_rate_holds_on_later_traffic(later: tuple[str, Later]) -> None:
    preset, run = later
    normal = run.windows.select(~run.bots)
    assert normal.n_windows >= 500
    flagged = run.detector.predict(normal).mean()
    assert flagged <= FALSE_ALERTS_FLOOR, f"{preset}: {flagged:.1%} of later normal sessions flagged"


def test_bots_are_ranked_at_least_as_well_as_by_isolation_forest(later: tuple[str, Later]) -> None:
    preset, run = later
    assert run.bots.sum() >= 15
    ours = roc_auc_score(run.bots, run.detector.decision_function(run.windows))
    forest = BASELINES["isolation-forest"](SEED).fit(run.training)
    theirs = roc_auc_score(run.bots, forest.decision_function(run.windows))
    assert ours >= AUROC_FLOOR[preset], f"{preset}: AUROC {ours:.3f}"
    assert ours >= theirs - BEHIND_FOREST[preset], f"{preset}: {ours:.3f} vs IsolationForest {theirs:.3f}"
