"""A merchant's prepared data: its export read, sessionized, tokenized and split once, then kept in its
state directory for every later message and run.

Flower starts a fresh ClientApp process for every message, and a round asks each merchant twice (train,
then evaluate): re-reading the export cost every message 0.7 s at 20,000 events and 6 s at a million
(BENCHMARKS.md, cold start). The prepared windows depend on the export's bytes, the preset, the session
settings, the token vocabulary and the pipeline's own code as imported, so the cache is keyed by all of
them and any change rebuilds it. The export is keyed by a hash of its whole content, the one read of the
file a message still makes (about 2 s per GB). The cache holds one entry, the latest, in
`<state-dir>/prepared/`, which can be deleted by hand.
A cache file that does not read back whole (zip CRCs) and consistent is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fedanom.common.backbone import sha256_file
from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.loader import BadRowPolicy, Progress, check_file
from fedanom.common.presets import Preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.tokens import VOCAB_VERSION, Popularity
from fedanom.common.windows import VALIDATION_FRACTION, Windows

CACHE_DIR = "prepared"
FORMAT = "prepared-1"
# The modules whose code decides what a window holds: a change to any of them is a new cache key.
PIPELINE_MODULES = (
    "columns", "events", "features", "ingest", "loader", "presets", "sessions", "tokens", "windows"
)  # fmt: skip
_TEXT_FIELDS = {"session", "user"}  # Python strings in memory, stored as fixed-width text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A merchant's sessions to train on and to validate on (`Windows.holdout`), and its item popularity."""

    train: Windows
    validation: Windows
    popularity: Popularity
    rows_quarantined: int  # bad rows the read set aside

    @property
    def events(self) -> int:
        return int(self.train.offsets[-1] + self.validation.offsets[-1])


def cache_key(data: Path, preset: Preset, session: SessionConfig) -> str:
    """What the prepared windows of this export depend on, as one hash."""
    digest = hashlib.sha256(sha256_file(data).encode())
    digest.update(
        f"{FORMAT}|{_PIPELINE}|{VOCAB_VERSION}|{preset!r}|{session!r}|{VALIDATION_FRACTION}".encode()
    )
    return digest.hexdigest()[:32]


def _pipeline_code() -> str:
    """The running pipeline's code, as imported (a long-lived worker keeps the code it started with)."""
    digest = hashlib.sha256()
    for module in PIPELINE_MODULES:
        digest.update(Path(sys.modules[f"fedanom.common.{module}"].__file__ or "").read_bytes())
    return digest.hexdigest()


_PIPELINE = _pipeline_code()


def cache_file(state_dir: Path, key: str) -> Path:
    return state_dir / CACHE_DIR / f"{key}.npz"


def prepare(
    data: Path,
    preset: Preset,
    state_dir: Path,
    session: SessionConfig | None = None,
    *,
    on_bad_rows: BadRowPolicy = "quarantine",
    quarantine_path: Path | None = None,
    progress: Progress | None = None,
) -> Prepared:
    """The export's prepared data: from the cache when it holds this key, else read (bad rows set aside
    in `quarantine_path`, by default `<state_dir>/quarantine.csv`), kept and returned."""
    session = session or SessionConfig()
    check_file(data)
    key = cache_key(data, preset, session)
    path = cache_file(state_dir, key)
    if path.exists():
        cached = _load(path)
        if cached is not None:
            if on_bad_rows == "fail" and cached.rows_quarantined:
                raise FedanomError(
                    f"{data} has {cached.rows_quarantined:,} bad rows (set aside when it was prepared: "
                    f"{quarantine_path or state_dir / 'quarantine.csv'}) and --on-bad-rows is fail"
                )
            return cached
        log.warning("%s is damaged; rebuilding it from %s", path, data)
    ingested = ingest(
        data,
        preset,
        config=session,
        on_bad_rows=on_bad_rows,
        quarantine_path=quarantine_path or state_dir / "quarantine.csv",
        progress=progress,
    )
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    train, validation = windows.holdout()
    prepared = Prepared(train, validation, ingested.popularity, ingested.report.rows_quarantined)
    _save(prepared, path)
    return prepared


def cache_state(data: Path, preset: Preset, state_dir: Path, session: SessionConfig | None = None) -> str:
    """In words, whether `state_dir` holds this export's prepared data (what `data check` reports)."""
    check_file(data)
    path = cache_file(state_dir, cache_key(data, preset, session or SessionConfig()))
    if path.exists():
        return f"current: {path} ({path.stat().st_size / 1e6:.1f} MB)"
    if any((state_dir / CACHE_DIR).glob("*.npz")):
        return f"stale: {state_dir / CACHE_DIR} holds another file's or settings' data; it will be rebuilt"
    return f"none in {state_dir}: `fedanom client` prepares it before it joins"


def _save(prepared: Prepared, path: Path) -> None:
    arrays: dict[str, np.ndarray] = {
        "rows_quarantined": np.int64(prepared.rows_quarantined),  # type: ignore[dict-item]
        "popularity.items": prepared.popularity.items,
        "popularity.counts": prepared.popularity.counts,
        "popularity.buckets": prepared.popularity.buckets,
    }
    for part in ("train", "validation"):
        windows: Windows = getattr(prepared, part)
        for f in fields(Windows):
            value = getattr(windows, f.name)
            arrays[f"{part}.{f.name}"] = value.astype(str) if f.name in _TEXT_FIELDS else value
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.{os.getpid()}.partial")  # runs preparing at once stay apart
    with open(staging, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stubs miss the keyword form
    staging.replace(path)
    for older in path.parent.glob("*.npz"):  # one entry: the export as it is now
        if older != path:
            older.unlink(missing_ok=True)


def _load(path: Path) -> Prepared | None:
    """The cached data, or None when the file does not read back whole and consistent."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}  # reading checks every member's CRC
        parts = {
            part: Windows(
                **{
                    f.name: arrays[f"{part}.{f.name}"].astype(object)
                    if f.name in _TEXT_FIELDS
                    else arrays[f"{part}.{f.name}"]
                    for f in fields(Windows)
                }
            )
            for part in ("train", "validation")
        }
        popularity = Popularity(*(arrays[f"popularity.{name}"] for name in ("items", "counts", "buckets")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if not all(_consistent(w) for w in parts.values()):
        return None
    return Prepared(parts["train"], parts["validation"], popularity, int(arrays["rows_quarantined"]))


def _consistent(windows: Windows) -> bool:
    """Every per-event array as long as the offsets say, every per-window array one per window."""
    offsets, n = windows.offsets, windows.n_windows
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        return False
    per_event = (windows.tokens, windows.ts, windows.gap_ms, windows.line)
    per_window = (
        windows.session, windows.user, windows.window_index, windows.closes_session, windows.start_ms
    )  # fmt: skip
    return (
        all(len(a) == offsets[-1] for a in per_event)
        and all(len(a) == n for a in per_window)
        and windows.features.shape[0] == n
        and windows.context.shape[0] == n
    )
