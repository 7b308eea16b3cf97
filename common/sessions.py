"""Group events into sessions and scoring windows, in memory bounded by a partition, not by the file.

A session is the export's own session id where it has one (its user is that of its first event);
otherwise a user's run of events, ended by an inactivity gap (default 30 minutes). A session longer
than `window` events is cut into consecutive windows, so every event is scored and no model input grows
without bound.

Exports are rarely sorted by user, so grouping needs all of a session's events together.
`SessionBuilder` hash-partitions events by session (or user) as they stream in: small inputs stay in
memory, larger ones spill each partition to an Arrow IPC file, and sessions are then built one partition
at a time. Peak memory is one read block plus one partition, whatever the file's size.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedanom.common.loader import EVENT_SCHEMA
from fedanom.common.settings import BackboneConfig


@dataclass(frozen=True)
class SessionConfig:
    """How events become sessions and windows."""

    gap_minutes: float = 30.0  # inactivity that ends a session when the export has no session id
    window: int = BackboneConfig.max_events  # most events in one scored window

    def __post_init__(self) -> None:
        if not self.gap_minutes > 0:
            raise ValueError("gap_minutes must be positive")
        if self.window < 2:
            raise ValueError("window must hold at least 2 events")


@dataclass
class SessionBatch:
    """The windows of one partition; events are stored window after window (CSR layout via `offsets`)."""

    # one entry per event, windows in order, events in time order inside each window
    ts: np.ndarray  # int64 Unix ms
    gap_ms: np.ndarray  # int64, time since the previous event of the same session; -1 for a session's first
    etype: np.ndarray  # int8 standard event code
    item: np.ndarray  # uint64 item hash
    cat: np.ndarray  # uint64 category hash, 0 when unknown
    session_pos: np.ndarray  # int32, position of the event within its session
    row: np.ndarray  # int64 stream row (LoadReport.line_numbers gives the file line)
    item_first: np.ndarray  # bool, first time the item appears in this session
    cat_first: np.ndarray  # bool, first time the category appears in this session
    # one entry per window
    offsets: np.ndarray  # int64, n_windows + 1
    user: pa.Array  # string
    session: pa.Array  # string: the export's session id, or "<user>:<start ms>"
    window_index: np.ndarray  # int32, 0 for a session's first window
    session_start_ms: np.ndarray  # int64

    @property
    def n_windows(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return len(self.ts)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_sessions(self) -> int:
        return int(np.count_nonzero(self.window_index == 0))


class SessionBuilder:
    """Collect event tables, partitioned by user; then yield one `SessionBatch` per partition."""

    def __init__(
        self, config: SessionConfig, n_partitions: int = 1, spill_dir: str | Path | None = None
    ) -> None:
        self.config = config
        self.n_partitions = max(1, n_partitions)
        self._memory: list[list[pa.Table]] = [[] for _ in range(self.n_partitions)]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        if self.n_partitions > 1:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedanom-spill-", dir=spill_dir)

    @staticmethod
    def partitions_for(input_bytes: int, compressed: bool, partition_bytes: int = 32 << 20) -> int:
        """How many partitions keep each near `partition_bytes` of (estimated uncompressed) input."""
        estimate = input_bytes * (5 if compressed else 1)
        return max(1, math.ceil(estimate / partition_bytes))

    def add(self, table: pa.Table) -> None:
        if self.n_partitions == 1:
            self._memory[0].append(table)
            return
        key = _group_key(table.column("sess").to_numpy(), table.column("user").to_numpy())
        part = ((key >> np.uint64(7)) % np.uint64(self.n_partitions)).astype(np.int16)  # radix-sortable
        order = np.argsort(part, kind="stable")
        table = table.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(self.n_partitions + 1))
        assert self._tmp is not None
        for p in range(self.n_partitions):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if hi > lo:
                if p not in self._writers:
                    path = Path(self._tmp.name) / f"part-{p}.arrow"
                    self._writers[p] = pa.ipc.new_stream(str(path), EVENT_SCHEMA)
                self._writers[p].write_table(table.slice(lo, hi - lo))

    def batches(self) -> Iterator[SessionBatch]:
        """Sessions of each partition in turn; spill files are removed when the iteration ends."""
        try:
            for writer in self._writers.values():
                writer.close()
            for p in range(self.n_partitions):
                if self.n_partitions == 1:
                    tables, self._memory[0] = self._memory[0], []
                elif p in self._writers:
                    with pa.ipc.open_stream(str(Path(self._tmp.name) / f"part-{p}.arrow")) as reader:  # type: ignore[union-attr]
                        tables = [reader.read_all()]
                else:
                    continue
                if tables:
                    yield sessionize(pa.concat_tables(tables), self.config)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


def sessionize(events: pa.Table, config: SessionConfig) -> SessionBatch:
    """Sort one partition's events by session (or user) and time; cut sessions and windows."""
    sess = events.column("sess").to_numpy()
    group = _group_key(sess, events.column("user").to_numpy())
    ts = events.column("ts").to_numpy()
    row = events.column("row").to_numpy()
    order = np.lexsort((ts, group))  # stable: equal times keep file order
    sess, group, ts, row = sess[order], group[order], ts[order], row[order]
    n = len(ts)

    diff = np.diff(ts)
    new_session = np.ones(n, dtype=bool)
    new_session[1:] = (group[1:] != group[:-1]) | (
        (sess[1:] == 0) & (diff > int(config.gap_minutes * 60_000))
    )
    starts = np.flatnonzero(new_session)
    session_of = np.cumsum(new_session) - 1
    pos = np.arange(n) - starts[session_of]
    gap = np.empty(n, dtype=np.int64)
    gap[0] = -1
    gap[1:] = diff
    gap[new_session] = -1

    window_starts = np.flatnonzero(pos % config.window == 0)
    offsets = np.append(window_starts, n).astype(np.int64)
    first_event = order[window_starts]
    session_start = ts[starts[session_of[window_starts]]]
    user_raw = pc.take(events.column("user_raw"), pa.array(first_event))
    sess_raw = pc.take(events.column("sess_raw"), pa.array(first_event))
    generated = pc.binary_join_element_wise(user_raw, pa.array(session_start).cast(pa.string()), ":")
    session_key = pc.if_else(pc.is_null(sess_raw), generated, sess_raw)

    item = events.column("item").to_numpy()[order]
    cat = events.column("cat").to_numpy()[order]
    return SessionBatch(
        ts=ts,
        gap_ms=gap,
        etype=events.column("etype").to_numpy()[order],
        item=item,
        cat=cat,
        session_pos=pos.astype(np.int32),
        row=row,
        item_first=_first_in_session(item, session_of),
        cat_first=_first_in_session(cat, session_of),
        offsets=offsets,
        user=user_raw.combine_chunks() if isinstance(user_raw, pa.ChunkedArray) else user_raw,
        session=session_key.combine_chunks() if isinstance(session_key, pa.ChunkedArray) else session_key,
        window_index=(pos[window_starts] // config.window).astype(np.int32),
        session_start_ms=session_start,
    )


def _group_key(sess: np.ndarray, user: np.ndarray) -> np.ndarray:
    """The export's session id defines a session where it has one (even if its user id varies, as in
    DIGINETICA's part-anonymous sessions); otherwise the user's events are cut by inactivity."""
    return np.where(sess != 0, sess, user)


def _first_in_session(values: np.ndarray, session_of: np.ndarray) -> np.ndarray:
    """True where a value appears for the first time within its session."""
    key = values * np.uint64(0x9E3779B97F4A7C15) + session_of.astype(np.uint64)
    return ~pd.Series(key).duplicated().to_numpy()
