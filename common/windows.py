"""Tokenized scoring windows: what the model reads, plus what outputs and explanations point back to.

Built from `SessionBatch`es, so training, scoring, the baselines and the simulations all use the same
units. Each window is framed `<bos> context... tokens... [<eos>]`: its session-context tokens (its length,
pace, regularity and item mix in coarse buckets, `tokens.CONTEXT`), then one token per event; `<eos>`
only closes a session's last window, so "the session ended here" is scored too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import numpy as np

from fedanom.common.features import FEATURE_NAMES, session_features
from fedanom.common.loader import LoadReport
from fedanom.common.sessions import SessionBatch
from fedanom.common.tokens import BOS, EOS, Popularity, encode, encode_context

VALIDATION_FRACTION = 0.15  # a merchant's latest finished sessions, which calibrate its detector


@dataclass
class Windows:
    # per event, window after window
    tokens: np.ndarray  # int32 behaviour tokens
    ts: np.ndarray  # int64 Unix ms
    gap_ms: np.ndarray  # int64, -1 for a session's first event
    line: np.ndarray  # int64 line (CSV) or row (Parquet) in the source file
    # per window
    offsets: np.ndarray  # int64, n + 1
    session: np.ndarray  # object: session key
    user: np.ndarray  # object: user id
    window_index: np.ndarray  # int32
    closes_session: np.ndarray  # bool: the session's last window (framed with <eos>)
    start_ms: np.ndarray  # int64, the session's first event
    features: np.ndarray  # float32 [n, n_features]: the feature reference's, the context's, the baselines'
    context: np.ndarray  # int32 [n, len(tokens.CONTEXT)]: the session-context tokens, from the features

    @classmethod
    def from_batches(
        cls, batches: Iterable[SessionBatch], popularity: Popularity, report: LoadReport | None = None
    ) -> Windows:
        parts = []
        for b in batches:
            next_index = np.append(b.window_index[1:], 0)
            features = session_features(b, popularity)
            parts.append(
                cls(
                    tokens=encode(b, popularity),
                    ts=b.ts,
                    gap_ms=b.gap_ms,
                    line=report.line_numbers(b.row) if report is not None else b.row,
                    offsets=b.offsets,
                    session=np.asarray(b.session.to_pylist(), dtype=object),
                    user=np.asarray(b.user.to_pylist(), dtype=object),
                    window_index=b.window_index,
                    closes_session=next_index == 0,
                    start_ms=b.session_start_ms,
                    features=features,
                    context=encode_context(features, FEATURE_NAMES),
                )
            )
        return cls.concat(parts)

    @classmethod
    def concat(cls, parts: list[Windows]) -> Windows:
        if not parts:
            raise ValueError("no windows to concatenate")
        if len(parts) == 1:
            return parts[0]
        offsets = [parts[0].offsets]
        for p in parts[1:]:
            offsets.append(p.offsets[1:] + offsets[-1][-1])
        values = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(cls)
            if f.name != "offsets"
        }
        return cls(offsets=np.concatenate(offsets), **values)

    @property
    def n_windows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def framed_lengths(self) -> np.ndarray:
        return self.lengths + 1 + self.context.shape[1] + self.closes_session

    def framed(self, i: int) -> np.ndarray:
        """Window i as the model reads it: <bos> context... events... [<eos>]."""
        body = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        tail = [EOS] if self.closes_session[i] else []
        return np.concatenate([[BOS], self.context[i], body, tail]).astype(np.int64)

    def select(self, keep: np.ndarray) -> Windows:
        """The windows where `keep` is true (a bool mask or an index array), in their order."""
        index = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        lengths = self.lengths[index]
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in index]
        events: np.ndarray = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        per_event = {"tokens", "ts", "gap_ms", "line"}
        values = {
            f.name: getattr(self, f.name)[events if f.name in per_event else index]
            for f in fields(self)
            if f.name != "offsets"
        }
        return Windows(offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), **values)

    def keyed(self, prefix: str) -> Windows:
        """The same windows with session keys prefixed, so windows from several sources (merchants,
        files) that each number their own users from 1 stay apart when pooled."""
        keys = np.array([f"{prefix}:{key}" for key in self.session], dtype=object)
        return replace(self, session=keys)

    def holdout(self, fraction: float = VALIDATION_FRACTION) -> tuple[Windows, Windows]:
        """(train, validation): the validation part is the latest `fraction` of the sessions that had
        ended when the export did, the rest trains.

        A session that started closer to the export's end than this export's sessions last (the 99th
        percentile of their durations) may still have been running: the export cut it short. Cut
        sessions are short and unremarkable, so a threshold calibrated on them sits too low for the next
        day's finished sessions (the REES46 sample's latest 4 minutes, a merchant's validation by session
        count, held 1.7 events per session against 3-4 before: 3.4% of later normal sessions flagged at
        a 1% alert rate; BENCHMARKS.md, session 8). They train instead.
        """
        first: dict[object, int] = {}
        last: dict[object, int] = {}
        for key, lo, hi in zip(
            self.session, self.ts[self.offsets[:-1]], self.ts[self.offsets[1:] - 1], strict=True
        ):
            first[key], last[key] = min(first.get(key, lo), lo), max(last.get(key, hi), hi)
        durations = np.array([last[key] - first[key] for key in first])
        cut_short_after = self.ts.max() - np.quantile(durations, 0.99) if len(durations) else 0
        ended = np.array([first[key] < cut_short_after for key in self.session], dtype=bool)
        if not ended.any():  # an export shorter than a session: nothing is known to have ended
            ended[:] = True
        early, validation = self.select(ended).chronological_split(1.0 - fraction, fraction)
        return Windows.concat([early, self.select(~ended)]), validation

    def labels_of(self, part: Windows, labels: np.ndarray | None) -> np.ndarray | None:
        """The labels (one per window of these windows) of `part`'s windows, matched by (session, window
        index): `part` is a selection of these windows, as `holdout` makes."""
        if labels is None:
            return None
        index = {(s, int(w)): i for i, (s, w) in enumerate(zip(self.session, self.window_index, strict=True))}
        return np.array(
            [labels[index[(s, int(w))]] for s, w in zip(part.session, part.window_index, strict=True)]
        )

    def chronological_split(self, *fractions: float) -> list[Windows]:
        """Split by session start time (a session's windows stay together): earliest first."""
        order = np.argsort(self.start_ms, kind="stable")
        sessions_in_order = list(dict.fromkeys(self.session[order]))
        edges = np.cumsum([0.0, *fractions]) * len(sessions_in_order)
        rank = {key: i for i, key in enumerate(sessions_in_order)}
        session_rank = np.array([rank[s] for s in self.session])
        return [
            self.select((session_rank >= lo) & (session_rank < hi)) for lo, hi in itertools.pairwise(edges)
        ]
