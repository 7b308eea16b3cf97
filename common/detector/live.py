"""Live scoring: a merchant's events scored as they arrive, each against its session so far.

`fedanom serve` keeps its open sessions here. An event joins its open session, cut as `fedanom score`
cuts them (the export's session id, else the user's run of events ended by the inactivity gap), and the
session is scored by the batch scorer's own code: its events so far become one session of a `Windows`
and `BehaviourDetector.combine` scores it. A running score is the score the session would get if it
were cut off after this event, not ended (no `<eos>`); the final score, taken when the session ends, is
the one `fedanom score` gives the same events (a test holds them equal to 1e-4).

Each event re-reads its session's windows rather than taking one step on a key/value cache: the context
tokens that open a window summarise the whole window (its length, pace, item mix), so a new event changes
what comes before every earlier event, and cached positions would no longer be the batch scorer's.

Item popularity follows the served traffic as `fedanom score` follows its file: the detector's counts
plus those of every event served so far, re-bucketed at most every `refresh_s` seconds.

Open sessions are bounded by memory: past the cap, the least recently active are dropped unscored,
logged and counted. A session that sees no event for the inactivity gap ends on its own.

The flag follows the detector's calibrated threshold. With `track` (two alert rates, the merchant's
bounds) it follows the traffic instead: once `TRACK_WARMUP` sessions have ended on a detector, the
threshold is the score that the alert rate's share of its last `TRACK_WINDOW` ended sessions passed,
held between the calibrated thresholds of the two bounds, so a flood of bots cannot lift it out of
reach and a quiet day cannot sink it into normal traffic.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.scoring import event_words, explain
from fedanom.common.live_events import RequestReader
from fedanom.common.presets import Preset
from fedanom.common.sessions import sessionize
from fedanom.common.tokens import ItemCounter, Popularity
from fedanom.common.windows import Windows

TRACK_WINDOW = 1_000  # ended sessions the tracked threshold looks back on
TRACK_WARMUP = 200  # ended sessions before the tracked threshold leaves the calibrated one
MAX_SERVED_ITEMS = 1_000_000  # distinct items of the served traffic counted for popularity (16 MB)
SESSION_OVERHEAD_BYTES = 2_048  # an open session's bookkeeping beyond its events, for the memory cap

log = logging.getLogger(__name__)


@dataclass
class LoadedDetector:
    """A detector as loaded at one moment: sessions keep the one they started with across a reload."""

    detector: BehaviourDetector
    digest: str  # the detector's manifest hash, short: which model scored an event
    loaded_at: float = field(default_factory=time.time)
    popularity: Popularity | None = None  # the detector's counts plus the served traffic's
    refreshed_at: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=TRACK_WINDOW))  # final scores


@dataclass
class OpenSession:
    key: str  # the session id `fedanom score` gives it
    model: LoadedDetector
    events: pa.Table
    last_ts: int
    touched: float = field(default_factory=time.monotonic)
    nbytes: int = 0  # what it holds, for the memory cap: set with its events (Arrow's count is not free)

    def hold(self, events: pa.Table) -> None:
        self.events, self.nbytes = events, events.nbytes + SESSION_OVERHEAD_BYTES


@dataclass
class Scored:
    """A session's running answer after an event, or its final one."""

    session_id: str
    score: float
    flagged: bool
    model: str
    events: int
    words: list[str]

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "score": self.score,
            "flagged": self.flagged,
            "events": self.events,
            "model": self.model,
            "why": self.words,
        }


class LiveSessions:
    """The open sessions of one served stream, scored event by event."""

    def __init__(
        self,
        model: LoadedDetector,
        preset: Preset,
        *,
        alert_rate: float | None = None,
        max_bytes: int = 256 << 20,
        refresh_s: float = 60.0,
        track: tuple[float, float] | None = None,
    ) -> None:
        self.model = model
        self.track = track
        self.reader = RequestReader(preset)
        self.alert_rate = alert_rate
        self.max_bytes = max_bytes
        self.refresh_s = refresh_s
        self.sessions: OrderedDict[int, OpenSession] = OrderedDict()  # by group key, least recent first
        self.by_id: dict[str, int] = {}
        self.served = ItemCounter(max_items=MAX_SERVED_ITEMS)
        self.held_bytes = 0
        self.evicted = 0
        for rate in track or ():  # a bad alert rate or bound fails at start, not on the first event
            model.detector.threshold(rate)
        self.threshold(model)

    def threshold(self, model: LoadedDetector) -> float:
        """The threshold in force for sessions scored by `model`: calibrated, or tracked (see above)."""
        detector = model.detector
        calibrated = detector.threshold(self.alert_rate)
        if self.track is None or len(model.recent) < TRACK_WARMUP:
            return calibrated
        fewest, most = self.track
        rate = detector.alert_rate(self.alert_rate)
        tracked = float(np.quantile(np.fromiter(model.recent, float), 1.0 - rate))
        return float(np.clip(tracked, detector.threshold(most), detector.threshold(fewest)))

    def add(
        self, records: Sequence[object]
    ) -> tuple[list[tuple[int, Scored]], list[dict[str, Any]], list[tuple[int, Scored]]]:
        """Score each valid record against its session: (position, answer) per event (the session's
        running score after its last event among these), the rejected ones with position, field and
        reason, and (position, final) for each session an event ended (its user's inactivity gap passed)."""
        table, rejected = self.reader.read(records)
        sess = table.column("sess").to_numpy()
        by_id = sess != 0
        group = np.where(by_id, sess, table.column("user").to_numpy())
        ts = table.column("ts").to_numpy()
        positions = table.column("row").to_numpy() - 1
        self.served.add(table.column("item").to_numpy())
        gap_ms = int(self.model.detector.session.gap_minutes * 60_000)
        # what to put back if the pass cannot be scored, so that a request tried again is not counted twice
        before = (OrderedDict(self.sessions), dict(self.by_id), self.held_bytes)
        changed: dict[int, tuple[OpenSession, pa.Table, int]] = {}
        joined: list[OpenSession] = []  # the session each valid event joined
        ended: list[OpenSession] = []
        ended_at: list[int] = []
        for i in range(table.num_rows):
            key = int(group[i])
            session = self.sessions.get(key)
            if session is not None and not by_id[i] and ts[i] - session.last_ts > gap_ms:
                ended.append(self._close(key))
                ended_at.append(int(positions[i]))
                session = None
            row = table.take([i])  # a copy: a session must not hold its request's buffers alive
            if session is None:
                session = self._open(key, row)
            else:
                changed.setdefault(id(session), (session, session.events, session.last_ts))
                self.held_bytes -= session.nbytes
                session.hold(pa.concat_tables([session.events, row]).combine_chunks())
                session.last_ts = max(session.last_ts, int(ts[i]))
            session.touched = time.monotonic()
            self.sessions.move_to_end(key)
            self.held_bytes += session.nbytes
            joined.append(session)
        # each session scored once a pass, as it stands after its last event in the pass: the events of one
        # session that arrive together share that answer, so a bulk upload costs its events, not their square
        latest = list({id(s): s for s in joined}.values())
        try:
            answers = self._score([(s, False) for s in latest] + [(s, True) for s in ended])
        except Exception:
            self.sessions, self.by_id, self.held_bytes = before
            for session, events, last_ts in changed.values():
                session.hold(events)
                session.last_ts = last_ts
            raise
        self._evict()
        by_session = {id(s): a for s, a in zip(latest, answers, strict=False)}
        running, finals = [by_session[id(s)] for s in joined], answers[len(latest) :]
        return (
            list(zip(positions.tolist(), running, strict=True)),
            rejected,
            list(zip(ended_at, finals, strict=True)),
        )

    def size(self, session_id: str) -> int | None:
        """How many events the open session holds; None if no such session is open."""
        key = self.by_id.get(session_id)
        return None if key is None else self.sessions[key].events.num_rows

    def end(self, session_id: str) -> Scored | None:
        """The session's final score, its memory freed; None if no such session is open."""
        key = self.by_id.get(session_id)
        if key is None:
            return None
        session = self._close(key)
        try:
            return self._score([(session, True)])[0]
        except Exception:  # still open: ending it can be asked again
            self._reopen(key, session)
            raise

    def expire(self, idle_s: float | None = None) -> list[Scored]:
        """End the sessions that saw no event for the inactivity gap (or `idle_s`), with their finals."""
        idle = self.model.detector.session.gap_minutes * 60 if idle_s is None else idle_s
        now = time.monotonic()
        stale = [key for key, s in self.sessions.items() if now - s.touched >= idle]
        closed = [self._close(key) for key in stale]
        try:
            return self._score([(s, True) for s in closed])
        except Exception:  # still open: the next sweep tries again
            for key, session in zip(stale, closed, strict=True):
                self._reopen(key, session)
            raise

    # ------------------------------------------------------------------------------------------ inside
    def _open(self, key: int, row: pa.Table) -> OpenSession:
        sess_raw = row.column("sess_raw")[0].as_py()
        start = int(row.column("ts")[0].as_py())
        name = sess_raw if sess_raw is not None else f"{row.column('user_raw')[0].as_py()}:{start}"
        session = OpenSession(key=name, model=self.model, events=row, last_ts=start)
        session.hold(row)
        self.sessions[key] = session
        self.by_id[name] = key
        return session

    def _close(self, key: int) -> OpenSession:
        session = self.sessions.pop(key)
        self.by_id.pop(session.key, None)
        self.held_bytes -= session.nbytes
        return session

    def _reopen(self, key: int, session: OpenSession) -> None:
        self.sessions[key] = session
        self.by_id[session.key] = key
        self.held_bytes += session.nbytes

    def _evict(self) -> None:
        while self.held_bytes > self.max_bytes and len(self.sessions) > 1:
            key, oldest = next(iter(self.sessions.items()))
            self._close(key)
            self.evicted += 1
            log.warning(
                "memory cap: dropped the least recently active open session %s (%d events) unscored",
                oldest.key,
                oldest.events.num_rows,
            )

    def _popularity(self, model: LoadedDetector) -> Popularity:
        now = time.monotonic()
        if model.popularity is None or now - model.refreshed_at >= self.refresh_s:
            model.popularity = model.detector.popularity.updated(self.served.popularity())
            model.refreshed_at = now
        return model.popularity

    def _score(self, pieces: list[tuple[OpenSession, bool]]) -> list[Scored]:
        """Each piece (a session's events so far, and whether it has ended) scored as a session of its
        own, with the model the session started with; pieces of one model share one pass."""
        answers: dict[int, Scored] = {}
        for model in {id(s.model): s.model for s, _ in pieces}.values():
            mine = [i for i, (s, _) in enumerate(pieces) if s.model is model]
            answers.update(zip(mine, self._score_with(model, [pieces[i] for i in mine]), strict=True))
        return [answers[i] for i in range(len(pieces))]

    def _score_with(self, model: LoadedDetector, pieces: list[tuple[OpenSession, bool]]) -> list[Scored]:
        if not pieces:
            return []
        detector = model.detector
        tables = [_as_session(session.events, i) for i, (session, _) in enumerate(pieces)]
        windows = Windows.from_batches(
            [sessionize(pa.concat_tables(tables), detector.session)], self._popularity(model)
        )
        piece_of = windows.session.astype(np.int64)
        ended = np.array([closed for _, closed in pieces])
        windows.closes_session &= ended[piece_of]  # a running session has not ended: no <eos> yet
        surprise = detector.surprise(windows)
        scores = detector.combine(surprise, windows)
        threshold = self.threshold(model)
        answers = []
        for i, (session, closed) in enumerate(pieces):
            own = np.flatnonzero(piece_of == i)
            best = own[np.argmax(scores[own])]
            score = float(scores[best])
            if closed:
                words = explain(surprise, windows, int(best), reference=detector.reference, where="event")
                model.recent.append(score)
            else:  # the session's latest event, the last of its last window
                e = int(windows.offsets[own[-1] + 1] - 1)
                words = [event_words(float(surprise.event[e]), windows, e, "event")]
            answers.append(
                Scored(session.key, score, score > threshold, model.digest, session.events.num_rows, words)
            )
        return answers


def _as_session(events: pa.Table, piece: int) -> pa.Table:
    """The events as a session of their own (an export session id that is the piece's number), so one
    sessionize pass keeps every piece apart, whatever user or gap they share; each event's row is its
    place in the session as it arrived, which its explanation names ("event 3")."""
    n = events.num_rows
    row = events.schema.get_field_index("row")
    events = events.set_column(row, "row", pa.array(np.arange(1, n + 1, dtype=np.int64)))
    sess = events.schema.get_field_index("sess")
    events = events.set_column(sess, "sess", pa.array(np.full(n, piece + 1, dtype=np.uint64)))
    raw = events.schema.get_field_index("sess_raw")
    return events.set_column(raw, "sess_raw", pa.array([str(piece)] * n, pa.string()))
