"""Property-based tests: for any log, rows are conserved and quarantined at their exact lines; tokens do
not depend on the order of rows in the file nor on whether partitions were spilled to disk."""

from __future__ import annotations

import csv
import random
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedanom.common.ingest import ingest
from fedanom.common.loader import EventReader
from fedanom.common.presets import resolve_preset
from fedanom.common.tokens import encode

HEADER = "user_id,timestamp,event_type,item_id,category,price"
ids = st.text(alphabet="abcdefgh0123456789", min_size=1, max_size=6)
EVENTS = ["view", "pv", "cart", "buy", "Purchase", "fav", " view ", "addtocart", "transaction"]

# corruption -> (how it changes a valid row, the reason the loader must give)
CORRUPTIONS = {
    "timestamp": (lambda f: [f[0], "x" + f[1], *f[2:]], "unparseable timestamp"),
    "user": (lambda f: ["", *f[1:]], "missing user_id"),
    "event": (lambda f: [*f[:2], "teleport", *f[3:]], "unknown event type"),
    "fields": (lambda f: f[:-1], "wrong number of fields"),
    "price": (lambda f: [*f[:5], "-1"], "bad price"),
}


@st.composite
def event_rows(draw: st.DrawFn) -> list[list[str]]:
    n = draw(st.integers(1, 40))
    rows = []
    for _ in range(n):
        price = draw(st.one_of(st.just(""), st.floats(0, 1e6).map(lambda p: f"{p:.2f}")))
        rows.append(
            [
                draw(ids),
                str(draw(st.integers(1_500_000_000, 1_800_000_000))),
                draw(st.sampled_from(EVENTS)),
                draw(ids),
                draw(st.one_of(st.just(""), ids)),
                price,
            ]
        )
    return rows


@settings(max_examples=60, deadline=None)
@given(
    rows=event_rows(), corruption=st.lists(st.sampled_from([None, *CORRUPTIONS]), min_size=40, max_size=40)
)
def test_rows_are_conserved_and_bad_rows_land_at_their_lines(
    rows: list[list[str]], corruption: list[str | None]
) -> None:
    expected_bad: list[tuple[int, str]] = []
    lines = []
    for i, fields in enumerate(rows):
        kind = corruption[i]
        if kind is not None:
            change, reason = CORRUPTIONS[kind]
            fields = change(fields)
            expected_bad.append((i + 2, reason))
        lines.append(",".join(fields))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.csv"
        path.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
        reader = EventReader(path, resolve_preset(None), quarantine_path=Path(tmp) / "q.csv")
        try:
            kept = sum(t.num_rows for t in reader)
        except Exception as exc:  # all rows bad is the one allowed failure
            assert len(expected_bad) == len(rows), exc
            kept = 0
        report = reader.report
        assert report.rows_in == len(rows)
        assert kept == report.rows_kept == len(rows) - len(expected_bad)
        assert report.conserved
        if expected_bad:
            with open(Path(tmp) / "q.csv", newline="") as fh:
                got = [(int(r["line"]), r["reason"]) for r in csv.DictReader(fh)]
            assert got == expected_bad


def session_tokens(path: Path, partition_bytes: int) -> dict[tuple[str, int], list[int]]:
    ingested = ingest(path, resolve_preset(None), partition_bytes=partition_bytes)
    out = {}
    for batch in ingested.batches():
        tokens = encode(batch, ingested.popularity)
        keys = batch.session.to_pylist()
        for w in range(batch.n_windows):
            out[(keys[w], int(batch.window_index[w]))] = tokens[
                batch.offsets[w] : batch.offsets[w + 1]
            ].tolist()
    return out


@settings(max_examples=40, deadline=None)
@given(rows=event_rows(), seed=st.integers(0, 2**32 - 1))
def test_tokens_ignore_row_order_and_spilling(rows: list[list[str]], seed: int) -> None:
    # distinct timestamps per user, so the order inside a session is defined by time alone
    seen: set[tuple[str, str]] = set()
    rows = [r for r in rows if (r[0], r[1]) not in seen and not seen.add((r[0], r[1]))]  # type: ignore[func-returns-value]
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a.csv", Path(tmp) / "b.csv"
        a.write_text(HEADER + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
        b.write_text(HEADER + "\n" + "\n".join(",".join(r) for r in shuffled) + "\n")
        in_memory = session_tokens(a, partition_bytes=1 << 30)
        assert session_tokens(b, partition_bytes=1 << 30) == in_memory
        assert session_tokens(b, partition_bytes=128) == in_memory  # spilled across many partitions
        assert sum(len(t) for t in in_memory.values()) == len(rows)
        assert all(np.all(np.array(t) >= 3) for t in in_memory.values())
