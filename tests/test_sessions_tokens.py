"""Sessions, windows, behaviour tokens and session features on small hand-made logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedanom.common.features import FEATURE_NAMES, session_features
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.tokens import (
    BOS,
    CONTEXT_WIDTHS,
    RADICES,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    VOCAB_VERSION,
    ItemCounter,
    Popularity,
    decode,
    describe,
    encode,
    encode_context,
    vocabulary_table,
    vocabulary_version,
)
from fedanom.common.windows import Windows

HEADER = "user_id,timestamp,event_type,item_id,category,session_id\n"


def sessions_of(tmp_path: Path, rows: list[str], **config: float) -> list:
    path = tmp_path / "events.csv"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    ingested = ingest(path, resolve_preset(None), config=SessionConfig(**config))  # type: ignore[arg-type]
    return [(b, ingested.popularity) for b in ingested.batches()]


def test_inactivity_gap_splits_a_users_events(tmp_path: Path) -> None:
    rows = ["u,0000001700000000,view,a,c,", "u,1700000600,view,b,c,", "u,1700003000,view,c,c,"]
    ((batch, _),) = sessions_of(tmp_path, rows, gap_minutes=30)
    assert batch.n_sessions == 2 and batch.lengths.tolist() == [2, 1]
    assert batch.gap_ms.tolist() == [-1, 600_000, -1]
    ((batch, _),) = sessions_of(tmp_path, rows, gap_minutes=60)
    assert batch.n_sessions == 1


def test_export_session_ids_define_sessions(tmp_path: Path) -> None:
    rows = ["u,1700000000,view,a,c,s1", "u,1700000001,view,b,c,s2", "v,1700000002,view,b,c,s1"]
    ((batch, _),) = sessions_of(tmp_path, rows)
    assert batch.n_sessions == 2
    keys = dict(zip(batch.session.to_pylist(), batch.lengths.tolist(), strict=True))
    assert keys == {"s1": 2, "s2": 1}


def test_windows_cover_every_event_and_keep_session_gaps(tmp_path: Path) -> None:
    rows = [f"u,{1700000000 + 2 * i},view,i{i},c," for i in range(10)]
    ((batch, _),) = sessions_of(tmp_path, rows, window=4)
    assert batch.lengths.tolist() == [4, 4, 2]
    assert batch.window_index.tolist() == [0, 1, 2]
    assert batch.session.to_pylist() == ["u:1700000000000"] * 3
    # a continuation window's first event still carries its real gap, not "first event"
    assert batch.gap_ms[batch.offsets[1]] == 2000


def test_validation_holds_the_latest_sessions_that_had_ended_when_the_export_did(tmp_path: Path) -> None:
    """Sessions that may still have been running at the export's end (started later than the export's
    sessions last) train instead of calibrating; no window is lost."""
    rows = [f"u{i},{1700000000 + 300 * i + 30 * k},view,i{k},c," for i in range(40) for k in range(3)]
    rows.append("late,1700011730,view,a,c,")  # started 30 s before the export's last event
    batches = sessions_of(tmp_path, rows)
    windows = Windows.from_batches([b for b, _ in batches], batches[0][1])
    train, validation = windows.holdout(0.15)
    assert train.n_windows + validation.n_windows == windows.n_windows == 41
    assert set(validation.user) == {f"u{i}" for i in range(34, 39)}  # the latest 15% of the 39 that ended
    assert {"late", "u39"} <= set(train.user)


def test_token_fields_describe_the_behaviour(tmp_path: Path) -> None:
    rows = [
        "u,1700000000,view,a,c1,",
        "u,1700000000.5,view,a,c1,",  # same item again, 0.5 s later
        "u,1700000030,cart,b,c2,",  # new item, new category
        "u,1700000031,purchase,a,c1,",  # item and category seen earlier
    ]
    ((batch, popularity),) = sessions_of(tmp_path, rows)
    words = [decode(int(t)) for t in encode(batch, popularity)]
    assert [w["event"] for w in words] == ["view", "view", "cart", "purchase"]
    assert [w["gap"] for w in words] == ["first", "<1s", "<30s", "<3s"]
    assert [w["item"] for w in words] == ["new item", "same item again", "new item", "item seen earlier"]
    assert [w["category"] for w in words] == [
        "new category",
        "same category",
        "new category",
        "category seen earlier",
    ]
    assert describe(int(encode(batch, popularity)[1])).startswith(
        "view <1s after the previous event, same item"
    )


def test_tokens_never_depend_on_raw_ids(tmp_path: Path) -> None:
    rows = ["u,1700000000,view,a,c1,", "u,1700000004,cart,b,c1,", "u,1700000009,view,a,c1,"]
    renamed = [
        r.replace(",a,", ",zz9,").replace(",b,", ",q,").replace("c1", "k").replace("u,", "w,") for r in rows
    ]
    ((first, pop_first),) = sessions_of(tmp_path, rows)
    ((second, pop_second),) = sessions_of(tmp_path, renamed)
    assert np.array_equal(encode(first, pop_first), encode(second, pop_second))


def test_token_ids_round_trip_through_their_fields() -> None:
    assert len(SPECIAL_TOKENS) + int(np.prod(RADICES)) + sum(CONTEXT_WIDTHS) == VOCAB_SIZE
    assert decode(BOS) == {"special": "<bos>"}
    assert len({tuple(decode(t).values()) for t in range(len(SPECIAL_TOKENS), VOCAB_SIZE)}) == VOCAB_SIZE - 3
    with pytest.raises(ValueError):
        decode(VOCAB_SIZE)


def test_vocabulary_version_is_pinned_and_documented() -> None:
    # Changing the token specification must be a deliberate version bump.
    assert vocabulary_version() == VOCAB_VERSION
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert VOCAB_VERSION in readme
    assert vocabulary_table() in readme


def test_popularity_buckets_by_event_share() -> None:
    items = np.array([1, 2, 3, 4, 5, 6], dtype=np.uint64)
    counts = np.array([45, 25, 10, 10, 5, 5])
    pop = Popularity.from_counts(items, counts)
    # share of events before each: 0, .45, .70, .70 (tie), .90, .90 (tie)
    assert pop.lookup(items).tolist() == [4, 3, 2, 2, 1, 1]
    assert pop.lookup(np.array([99], dtype=np.uint64)).tolist() == [0]


def test_later_traffic_updates_popularity_instead_of_meeting_unknown_items() -> None:
    """A new item in scored traffic is bucketed by its count there, like a training item, so the
    day-to-day change of a catalogue does not turn into tokens training never showed."""
    earlier = Popularity.from_counts(np.array([1, 2, 3], dtype=np.uint64), np.array([50, 30, 20]))
    later = Popularity.from_counts(np.array([3, 7, 8], dtype=np.uint64), np.array([5, 60, 1]))
    both = earlier.updated(later)
    assert both.lookup(np.array([7, 8, 9], dtype=np.uint64)).tolist() == [4, 1, 0]
    assert both.counts[both.items.tolist().index(3)] == 25


def test_item_counter_merges_chunks_exactly() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.integers(1, 500, 1000).astype(np.uint64) for _ in range(7)]
    counter = ItemCounter()
    for chunk in chunks:
        counter.add(chunk)
    keys, counts = np.unique(np.concatenate(chunks), return_counts=True)
    assert np.array_equal(counter.popularity().buckets, Popularity.from_counts(keys, counts).buckets)


def test_a_bounded_item_counter_keeps_the_most_counted_items() -> None:
    counter = ItemCounter(max_items=50)
    popular = np.repeat(np.arange(1, 41, dtype=np.uint64), 5)  # 40 items, 5 events each
    for start in range(1_000, 21_000, 1_000):  # and 20,000 random ids seen once each, as a scraper sends
        counter.add(np.concatenate([popular, np.arange(start, start + 1_000, dtype=np.uint64)]))
    seen = counter.popularity()
    assert len(seen.items) == 50
    assert set(range(1, 41)) <= set(seen.items.tolist())
    assert seen.counts[seen.items.tolist().index(7)] == 5 * 20


def test_popularity_round_trips_through_a_file(tmp_path: Path) -> None:
    pop = Popularity.from_counts(np.array([3, 1, 2], dtype=np.uint64), np.array([1, 5, 2]))
    pop.save(tmp_path / "pop.npz")
    again = Popularity.load(tmp_path / "pop.npz")
    assert np.array_equal(
        again.lookup(np.array([1, 2, 3, 4], dtype=np.uint64)),
        pop.lookup(np.array([1, 2, 3, 4], dtype=np.uint64)),
    )


def test_session_features_on_a_scripted_session(tmp_path: Path) -> None:
    rows = [f"bot,{1700000000 + i},view,i{i % 2},c{i % 2}," for i in range(7)] + [
        "bot,1700000007,purchase,i9,c9,"
    ]
    ((batch, popularity),) = sessions_of(tmp_path, rows)
    features = dict(zip(FEATURE_NAMES, session_features(batch, popularity)[0].tolist(), strict=True))
    assert features["n_events"] == 8
    assert features["duration_s"] == 7
    assert features["events_per_min"] == pytest.approx(8 / (7 / 60))
    assert features["gap_mean_s"] == pytest.approx(1.0) and features["gap_std_s"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert features["unique_item_ratio"] == pytest.approx(3 / 8)
    assert features["n_categories"] == 3
    shares = np.array([4, 3, 1]) / 8  # c0 x4, c1 x3, c9 x1
    assert features["category_entropy_bits"] == pytest.approx(
        float(-(shares * np.log2(shares)).sum()), rel=1e-5
    )
    assert features["frac_purchase"] == pytest.approx(1 / 8)
    assert features["purchase_without_cart"] == 1.0


def test_context_tokens_describe_the_whole_session(tmp_path: Path) -> None:
    rows = [f"bot,{1700000000 + i},view,i{i},c{i % 2}," for i in range(8)]
    ((batch, popularity),) = sessions_of(tmp_path, rows)
    tokens = encode_context(session_features(batch, popularity), FEATURE_NAMES)[0]
    words = [decode(int(t))["context"] for t in tokens]
    assert words[:3] == ["events 6 to under 9", "seconds 1 to under 10", "events per minute 60.5 and over"]
    assert words[3] == "gap variation (CV) under 0.1"  # a clock-like script
    assert words[4] == "share of distinct items 1 and over"
