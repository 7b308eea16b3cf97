"""Scored sessions: one row per session, the table `fedanom score` writes and a library user gets.

    from fedanom.common.detector import BehaviourDetector, score_events
    detector = BehaviourDetector.load("detector/")
    scores = score_events(detector, events)  # a DataFrame of events (or a file), one row per session

A session's score is its most anomalous window's, and so is its explanation; `flag` compares the score
with the detector's calibrated threshold (at its alert rate, or the one asked for).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.scoring import explain
from fedanom.common.ingest import Ingested, ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.windows import Windows

COLUMNS = ["session_id", "user_id", "start", "events", "score", "rank"]  # then explanation, flag


def score_ingested(
    detector: BehaviourDetector,
    ingested: Ingested,
    *,
    alert_rate: float | None = None,
    with_explanations: bool = False,
    on_batch: Callable[[], None] | None = None,
) -> pd.DataFrame:
    """Every session of an ingested export, ranked from the most anomalous; `on_batch` after each of its
    partitions (a progress bar)."""
    threshold = detector.threshold(alert_rate)  # a bad alert rate fails before the reading, not after
    parts = []
    for batch in ingested.batches():
        windows = Windows.from_batches([batch], ingested.popularity, ingested.report)
        surprise = detector.surprise(windows)
        frame = pd.DataFrame(
            {
                "session_id": windows.session,
                "user_id": windows.user,
                "start": pd.to_datetime(windows.start_ms, unit="ms", utc=True),
                "events": windows.lengths,
                "score": detector.combine(surprise, windows),
            }
        )
        if with_explanations:
            frame["explanation"] = [
                " | ".join(explain(surprise, windows, i, reference=detector.reference))
                for i in range(windows.n_windows)
            ]
        parts.append(frame)
        if on_batch is not None:
            on_batch()
    windows_frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS[:5])
    best = windows_frame.sort_values("score", ascending=False, kind="stable").drop_duplicates("session_id")
    totals = windows_frame.groupby("session_id", sort=False).events.sum()
    best = best.assign(events=best.session_id.map(totals).to_numpy()).reset_index(drop=True)
    best.insert(0, "rank", np.arange(1, len(best) + 1))
    best = best[COLUMNS + (["explanation"] if with_explanations else [])]
    return best.assign(flag=best.score > threshold)


def score_events(
    detector: BehaviourDetector,
    events: pd.DataFrame | str | Path,
    *,
    preset: str | None = None,
    alert_rate: float | None = None,
    with_explanations: bool = False,
) -> pd.DataFrame:
    """Score a DataFrame of events (columns named as the preset reads them; by default the standard
    names: user_id, timestamp, event_type, item_id and optionally session_id, category_id, price) or an
    export file. Read as `fedanom score` reads, sessionized with the detector's settings; a bad row
    raises FedanomError naming it instead of being dropped."""
    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(events, pd.DataFrame):
            path = Path(scratch) / "events.parquet"
            events.to_parquet(path, index=False)
        else:
            path = Path(events)
        ingested = ingest(
            path,
            resolve_preset(preset),
            config=detector.session,
            on_bad_rows="fail",
            popularity=detector.popularity,
        )
        return score_ingested(detector, ingested, alert_rate=alert_rate, with_explanations=with_explanations)


SCORE_FILES = (".csv", ".parquet")  # what `fedanom score --out` writes, by its suffix


def write_scores(sessions: pd.DataFrame, out: Path) -> None:
    """The scored sessions as CSV or Parquet, by the file's suffix (checked before the scoring starts)."""
    if out.suffix.lower() == ".parquet":
        sessions.to_parquet(out, index=False)
    else:
        sessions.to_csv(out, index=False)
