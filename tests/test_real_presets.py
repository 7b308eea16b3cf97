"""Every preset reads its real sample from ../shared/data with the row, user and session counts that the
sample's SOURCE.md states, and nothing is quarantined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from fedanom.common.events import EVENT_CODE
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.sessions import SessionConfig

# (preset, file, rows, users or None, sessions or None) from each SOURCE.md
SAMPLES = [
    ("taobao", "taobao-userbehavior/UserBehavior_2017-11-26_window.csv.gz", 110_300, 66_454, None),
    ("taobao", "taobao-userbehavior/UserBehavior_43users_full_history.csv.gz", 4_321, 43, None),
    ("rees46", "rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz", 17_434, 4_504, 5_066),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.tsv.gz", 70_278, None, 17_794),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.tsv.gz", 13_568, None, 3_416),
    ("diginetica", "diginetica-sample/sample_train-item-views.csv.gz", 12_391, None, 2_986),
    ("talkingdata", "talkingdata-adtracking-sample/train_sample.csv.gz", 100_000, 34_857, None),
]


@pytest.mark.parametrize(
    ("preset", "name", "rows", "users", "sessions"), SAMPLES, ids=[s[1] for s in SAMPLES]
)
def test_preset_reads_real_sample(
    shared_data: Path, preset: str, name: str, rows: int, users: int | None, sessions: int | None
) -> None:
    # a small partition size forces the spill-to-disk path on the larger samples
    ingested = ingest(shared_data / name, resolve_preset(preset), partition_bytes=1 << 20)
    batches = list(ingested.batches())
    report = ingested.report
    assert report.rows_in == rows
    assert report.rows_kept == rows
    assert report.rows_quarantined == 0
    assert sum(b.n_events for b in batches) == rows
    if users is not None:
        seen = set()
        for b in batches:
            seen.update(pc.unique(b.user).to_pylist())
        assert len(seen) == users
    if sessions is not None:
        assert sum(b.n_sessions for b in batches) == sessions


def test_taobao_event_mix_matches_source(shared_data: Path) -> None:
    ingested = ingest(shared_data / SAMPLES[0][1], resolve_preset("taobao"), config=SessionConfig(window=64))
    counts = sum((np.bincount(b.etype, minlength=len(EVENT_CODE)) for b in ingested.batches()), np.zeros(1))
    assert {code: int(c) for code, c in enumerate(counts) if c} == {
        EVENT_CODE["view"]: 98_361,
        EVENT_CODE["purchase"]: 2_493,
        EVENT_CODE["cart"]: 6_063,
        EVENT_CODE["fav"]: 3_383,
    }


def test_retailrocket_preset_reads_its_documented_schema(tmp_path: Path) -> None:
    """No RetailRocket sample ships in ../shared/data; its public schema is timestamp (ms), visitorid,
    event (view / addtocart / transaction), itemid, transactionid."""
    (tmp_path / "events.csv").write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433224214164,992329,view,248676,\n"
        "1433221999827,257597,addtocart,355908,\n"
        "1433222276276,257597,transaction,355908,4000\n"
        "1433221955914,483574,teleport,21410,\n"
    )
    ingested = ingest(
        tmp_path / "events.csv", resolve_preset("retailrocket"), quarantine_path=tmp_path / "q.csv"
    )
    (batch,) = list(ingested.batches())
    assert ingested.report.rows_kept == 4 and ingested.report.bad_rows == {"unknown event type": 1}
    first = batch.session.to_pylist().index("257597:1433221332117")
    events = batch.etype[batch.offsets[first] : batch.offsets[first + 1]].tolist()
    assert events == [EVENT_CODE["view"], EVENT_CODE["cart"], EVENT_CODE["purchase"]]
