"""What `fedanom data check` reports about an export: volume, users, sessions, time span, event mix,
session-length and gap quantiles, the bad rows by reason, and events that repeat another exactly.

The summary is built while the sessions stream past, keeping only per-session lengths and a fixed
log-histogram of gaps, so checking a file costs no more memory than reading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedanom.common.events import EVENT_TYPES
from fedanom.common.ingest import Ingested
from fedanom.common.sessions import SessionBatch
from fedanom.common.tokens import encode

QUANTILES = (0.5, 0.9, 0.99, 1.0)
# Gap histogram: 1 ms .. ~115 days in 1/20-decade bins; quantiles read off it are within ~12%.
_GAP_EDGES_S = np.logspace(-3, 7, 201)


@dataclass
class DataSummary:
    file: str
    preset: str
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    rows_conserved: bool
    bad_rows: dict[str, int]
    quarantine_file: str | None
    users: int
    sessions: int
    windows: int
    first_event: str | None
    last_event: str | None
    span_hours: float
    event_mix: dict[str, int]
    session_events: dict[str, float]
    session_minutes: dict[str, float]
    gap_seconds: dict[str, float]
    distinct_tokens: int
    vocabulary_version: str
    duplicate_events: int  # same session, time, event type and item as another event: kept, but counted
    notes: list[str] = field(default_factory=list)
    prepared: str | None = None  # with --state-dir: whether it holds this export prepared (`common.prepared`)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def summarize(ingested: Ingested, preset_name: str, vocabulary_version: str) -> DataSummary:
    """Stream the sessions once and summarise them."""
    report = ingested.report
    lengths: list[np.ndarray] = []
    durations: list[np.ndarray] = []
    users: list[pa.Array] = []
    mix = np.zeros(len(EVENT_TYPES), dtype=np.int64)
    gap_hist = np.zeros(len(_GAP_EDGES_S) + 1, dtype=np.int64)
    seen_tokens = np.zeros(0, dtype=np.int32)
    first_ts, last_ts = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    windows = duplicates = 0
    for batch in ingested.batches():
        windows += batch.n_windows
        duplicates += _repeated_events(batch)
        session_start = np.flatnonzero(batch.session_pos == 0)
        session_end = np.append(session_start[1:], batch.n_events) - 1
        lengths.append(session_end - session_start + 1)
        durations.append((batch.ts[session_end] - batch.ts[session_start]) / 60_000.0)
        users.append(pc.unique(batch.user))
        mix += np.bincount(batch.etype, minlength=len(EVENT_TYPES))
        gaps = batch.gap_ms[batch.gap_ms >= 0] / 1000.0
        gap_hist += np.bincount(np.searchsorted(_GAP_EDGES_S, gaps), minlength=len(gap_hist))
        seen_tokens = np.union1d(seen_tokens, encode(batch, ingested.popularity))
        first_ts, last_ts = min(first_ts, int(batch.ts.min())), max(last_ts, int(batch.ts.max()))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0)
    all_durations = np.concatenate(durations) if durations else np.zeros(0)
    notes = []
    if report.bad_rows:
        notes.append(
            f"{report.rows_quarantined} bad rows were set aside, not dropped; see the quarantine file"
        )
    if duplicates:
        notes.append(
            f"{duplicates} events repeat another event of their session exactly (time, type, item): kept "
            "as exported; if the export doubled them, deduplicate it"
        )
    if len(all_lengths) and np.median(all_lengths) <= 1:
        notes.append("most sessions have a single event: is the session gap or the session column right?")
    return DataSummary(
        file=str(report.path),
        preset=preset_name,
        rows_in=report.rows_in,
        rows_kept=report.rows_kept,
        rows_quarantined=report.rows_quarantined,
        rows_conserved=report.conserved,
        bad_rows=dict(report.bad_rows.most_common()),
        quarantine_file=str(report.quarantine_path) if report.quarantine_path else None,
        users=len(pc.unique(pa.concat_arrays(users))) if users else 0,
        sessions=len(all_lengths),
        windows=windows,
        first_event=_iso(first_ts) if lengths else None,
        last_event=_iso(last_ts) if lengths else None,
        span_hours=round((last_ts - first_ts) / 3_600_000, 3) if lengths else 0.0,
        event_mix={name: int(c) for name, c in zip(EVENT_TYPES, mix, strict=True) if c},
        session_events=_quantiles(all_lengths),
        session_minutes=_quantiles(all_durations),
        gap_seconds=_histogram_quantiles(gap_hist),
        distinct_tokens=len(seen_tokens),
        vocabulary_version=vocabulary_version,
        duplicate_events=duplicates,
        notes=notes,
    )


def _repeated_events(batch: SessionBatch) -> int:
    """Events whose session, time, event type and item another event of the batch already has."""
    session = np.cumsum(batch.session_pos == 0)
    keys = np.stack([session, batch.ts, batch.etype.astype(np.int64), batch.item.view(np.int64)], axis=1)
    return batch.n_events - len(np.unique(keys, axis=0))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {_label(q): round(float(np.quantile(values, q)), 3) for q in QUANTILES}


def _histogram_quantiles(hist: np.ndarray) -> dict[str, float]:
    total = hist.sum()
    if not total:
        return {}
    cumulative = np.cumsum(hist) / total
    out = {}
    for q in QUANTILES:
        b = int(np.searchsorted(cumulative, q - 1e-12))
        upper = _GAP_EDGES_S[min(b, len(_GAP_EDGES_S) - 1)]
        out[_label(q)] = round(float(upper), 3)
    return out


def _label(q: float) -> str:
    return "max" if q == 1.0 else f"p{round(q * 100):d}"
