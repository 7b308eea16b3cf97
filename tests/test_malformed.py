"""A corpus of broken exports: each gives one clear sentence, or a quarantine with every row accounted
for and the right line numbers."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.loader import EventReader
from fedanom.common.presets import resolve_preset
from fedanom.common.sessions import SessionConfig

HEADER = "user_id,timestamp,event_type,item_id,category,price\n"
GOOD = [
    "u1,1700000000,view,i1,c1,10.5",
    "u1,1700000005,cart,i1,c1,10.5",
    "u2,1700000010,view,i2,,",
    "u2,1700000070,purchase,i2,c2,3",
]


def write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def read_all(path: Path, **kwargs: object) -> EventReader:
    reader = EventReader(path, resolve_preset(None), **kwargs)  # type: ignore[arg-type]
    for _ in reader:
        pass
    return reader


def quarantine_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def fails_with(path: Path, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(FedanomError) as info:
        read_all(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_clean_file_keeps_every_row(tmp_path: Path) -> None:
    reader = read_all(write(tmp_path / "ok.csv", HEADER + "\n".join(GOOD) + "\n"))
    assert (reader.report.rows_in, reader.report.rows_kept, reader.report.rows_quarantined) == (4, 4, 0)


def test_bad_rows_are_quarantined_with_exact_lines(tmp_path: Path) -> None:
    lines = [
        GOOD[0],  # line 2
        "u1,not-a-time,view,i1,c1,1",  # 3 unparseable timestamp
        ",1700000001,view,i1,c1,1",  # 4 missing user
        "u1,1700000002,teleport,i1,c1,1",  # 5 unknown event type
        "u1,1700000003,view,i1",  # 6 wrong number of fields
        "u1,1700000004,view,,c1,1",  # 7 missing item
        "",  # 8 empty line
        "u1,1700000005,view,i1,c1,NaN",  # 9 bad price
        HEADER.strip(),  # 10 repeated header
        "u1,99999999999999,view,i1,c1,1",  # 11 out of range
        GOOD[1],  # 12
        "u3,1700000006,view,i3,c3,1,extra",  # 13 wrong number of fields
        GOOD[2],  # 14
    ]
    path = write(tmp_path / "mixed.csv", HEADER + "\n".join(lines) + "\n")
    reader = read_all(path, quarantine_path=tmp_path / "q.csv")
    report = reader.report
    assert report.rows_in == len(lines)
    assert report.rows_kept == 3
    assert report.conserved
    rows = quarantine_rows(tmp_path / "q.csv")
    assert [(int(r["line"]), r["reason"]) for r in rows] == [
        (3, "unparseable timestamp"),
        (4, "missing user_id"),
        (5, "unknown event type"),
        (6, "wrong number of fields"),
        (7, "missing item_id"),
        (8, "empty line"),
        (9, "bad price"),
        (10, "repeated header line"),
        (11, "timestamp out of range"),
        (13, "wrong number of fields"),
    ]
    assert rows[0]["column"] == "timestamp" and rows[0]["value"] == "not-a-time"
    assert rows[3]["record"] == "u1,1700000003,view,i1"
    assert sum(report.bad_rows.values()) == len(rows)


def test_kept_events_map_back_to_their_lines_past_dropped_rows(tmp_path: Path) -> None:
    lines = [GOOD[0], "short,row", "", GOOD[1], "x,y,z", GOOD[2]]
    path = write(tmp_path / "gaps.csv", HEADER + "\n".join(lines) + "\n")
    reader = EventReader(path, resolve_preset(None))
    rows = np.concatenate([t.column("row").to_numpy() for t in reader])
    assert reader.report.line_numbers(rows).tolist() == [2, 5, 7]


def test_fail_mode_names_file_line_column_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", HEADER + GOOD[0] + "\nu1,1700000001,view,i1,c1,-3\n" + GOOD[1] + "\n")
    message = fails_with(path, "line 3", "column 'price'", "bad price", on_bad_rows="fail")
    assert "-3" in message


def test_fail_mode_reports_the_earliest_of_field_count_and_value_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", HEADER + GOOD[0] + "\nu1,1,2\nu1,x,view,i1,c1,1\n")
    fails_with(path, "line 3", "wrong number of fields", on_bad_rows="fail")


def test_truncated_gzip(tmp_path: Path) -> None:
    body = HEADER + "\n".join(GOOD * 5000) + "\n"
    data = gzip.compress(body.encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    fails_with(path, "gzip data is truncated or corrupt")


@pytest.mark.parametrize("sep", [";", "\t"])
def test_wrong_delimiter(tmp_path: Path, sep: str) -> None:
    text = (HEADER + "\n".join(GOOD) + "\n").replace(",", sep)
    shown = "\\t" if sep == "\t" else sep
    fails_with(write(tmp_path / "semi.csv", text), "line 1", f"--sep '{shown}'")


def test_wrong_delimiter_on_a_headerless_preset(tmp_path: Path) -> None:
    path = write(tmp_path / "tb.csv", "1;2;3;pv;1511658000\n")
    with pytest.raises(FedanomError, match="line 1 has 1 fields but the taobao preset expects 5"):
        for _ in EventReader(path, resolve_preset("taobao")):
            pass


def test_missing_required_column(tmp_path: Path) -> None:
    path = write(tmp_path / "nocol.csv", "user_id,timestamp,item_id\nu1,1700000000,i1\n")
    fails_with(path, "no column 'event_type'", "columns found: user_id, timestamp, item_id")


def test_non_utf8_rows_are_quarantined(tmp_path: Path) -> None:
    data = (HEADER + GOOD[0] + "\n").encode() + b"u\xe9,1700000001,view,i1,c1,1\n" + (GOOD[1] + "\n").encode()
    path = write(tmp_path / "latin.csv", data)
    reader = read_all(path, quarantine_path=tmp_path / "q.csv")
    assert reader.report.rows_kept == 2 and reader.report.bad_rows == {"invalid UTF-8": 1}
    (row,) = quarantine_rows(tmp_path / "q.csv")
    assert row["line"] == "3" and row["column"] == "user_id" and "\\xe9" in row["record"]


def test_non_utf8_file_read_with_its_encoding(tmp_path: Path) -> None:
    data = (HEADER + GOOD[0] + "\n").encode() + "ü,1700000001,view,i1,c1,1\n".encode("latin-1")
    reader = read_all(write(tmp_path / "latin.csv", data), encoding="latin-1")
    assert reader.report.rows_kept == 2


def test_empty_file(tmp_path: Path) -> None:
    fails_with(write(tmp_path / "empty.csv", ""), "is empty")


def test_empty_gzip(tmp_path: Path) -> None:
    fails_with(write(tmp_path / "empty.csv.gz", ""), "is empty")


def test_header_only(tmp_path: Path) -> None:
    fails_with(write(tmp_path / "h.csv", HEADER), "has a header but no data rows")


def test_all_rows_bad_is_fatal_but_quarantined(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.csv", HEADER + "u1,soon,view,i1,,\nu2,later,view,i2,,\n")
    message = fails_with(
        path, "none of its 2 rows", "unparseable timestamp", quarantine_path=tmp_path / "q.csv"
    )
    assert "q.csv" in message
    assert len(quarantine_rows(tmp_path / "q.csv")) == 2


def test_missing_file(tmp_path: Path) -> None:
    fails_with(tmp_path / "nope.csv", "does not exist")


def test_huge_single_session_is_windowed_without_losing_events(tmp_path: Path) -> None:
    n = 10_007
    body = "".join(f"bot,{1700000000 + i},view,i{i % 17},c1,1\n" for i in range(n))
    ingested = ingest(
        write(tmp_path / "bot.csv", HEADER + body), resolve_preset(None), config=SessionConfig(window=128)
    )
    (batch,) = list(ingested.batches())
    assert batch.n_sessions == 1
    assert batch.n_windows == -(-n // 128)
    assert batch.n_events == n
    assert batch.lengths.max() == 128
    assert np.array_equal(np.sort(batch.row), np.arange(n))


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    csv_path = write(tmp_path / "ok.csv", HEADER + "\n".join(GOOD) + "\n")
    frame = pd.read_csv(csv_path, dtype={"category": "string", "user_id": "string", "item_id": "string"})
    frame.to_parquet(tmp_path / "ok.parquet")
    from_csv = next(iter(EventReader(csv_path, resolve_preset(None))))
    from_parquet = next(iter(EventReader(tmp_path / "ok.parquet", resolve_preset(None))))
    for column in ("user", "ts", "etype", "item", "cat", "price"):
        np.testing.assert_array_equal(
            from_csv.column(column).to_numpy(), from_parquet.column(column).to_numpy()
        )


@pytest.mark.parametrize("zone", [None, "UTC", "Europe/Berlin"])
def test_parquet_with_native_types_reads_like_csv(tmp_path: Path, zone: str | None) -> None:
    """As pandas and Spark write it: timestamp[us] (with or without a zone), integer ids, dictionary-encoded
    event types, and a list column fedanom does not read."""
    pd = pytest.importorskip("pandas")
    csv_path = write(tmp_path / "ok.csv", HEADER + "\n".join(GOOD) + "\n")
    frame = pd.read_csv(csv_path, dtype={"category": "string", "user_id": "string"})
    stamps = pd.to_datetime(frame.timestamp, unit="s", utc=True)
    frame["timestamp"] = stamps.dt.tz_convert(zone) if zone else stamps.dt.tz_localize(None)
    frame["item_id"] = frame.item_id.str[1:].astype("int64")
    frame["event_type"] = frame.event_type.astype("category")
    frame["tags"] = [[1, 2]] * len(frame)
    frame.to_parquet(tmp_path / "native.parquet")
    reader = EventReader(tmp_path / "native.parquet", resolve_preset(None))
    native = next(iter(reader))
    from_csv = next(iter(EventReader(csv_path, resolve_preset(None))))
    assert reader.report.rows_kept == len(GOOD)
    for column in ("user", "ts", "etype", "cat", "price"):
        np.testing.assert_array_equal(from_csv.column(column).to_numpy(), native.column(column).to_numpy())


def test_a_list_column_that_fedanom_reads_is_one_sentence(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {"user_id": ["u1"], "timestamp": [1700000000], "event_type": ["view"], "item_id": [["i1", "i2"]]}
    )
    frame.to_parquet(tmp_path / "nested.parquet")
    fails_with(tmp_path / "nested.parquet", "column 'item_id' holds list<", "not one value per row")


@pytest.mark.parametrize("size", [130 << 10, 10 << 20])
def test_an_overlong_line_is_quarantined_and_the_rest_read(tmp_path: Path, size: int) -> None:
    """A 130 KB field, and a 10 MB line longer than Arrow's parsing chunk, among good lines."""
    long_line = "u3,1700000020,view," + "x" * size + ",c1,1"
    path = write(tmp_path / "long.csv", HEADER + "\n".join([*GOOD[:2], long_line, *GOOD[2:]]) + "\n")
    reader = read_all(path, quarantine_path=tmp_path / "q.csv")
    assert (reader.report.rows_in, reader.report.rows_kept, reader.report.rows_quarantined) == (5, 4, 1)
    (row,) = quarantine_rows(tmp_path / "q.csv")
    assert row["line"] == "4" and row["reason"] == "field longer than 65,536 characters"
    assert row["column"] == "item_id" and len(row["record"]) < 5_000


def test_a_file_that_is_one_huge_line_is_one_sentence(tmp_path: Path) -> None:
    fails_with(write(tmp_path / "one.csv", "user_id,timestamp," + "x" * (10 << 20)), "line 1 cannot be read")


def test_cr_only_line_endings_read_like_lf(tmp_path: Path) -> None:
    path = write(tmp_path / "mac.csv", (HEADER + "\n".join(GOOD) + "\n").replace("\n", "\r"))
    reader = read_all(path)
    assert (reader.report.rows_in, reader.report.rows_kept) == (len(GOOD), len(GOOD))


def test_a_line_with_the_wrong_field_count_and_invalid_utf8_is_quarantined(tmp_path: Path) -> None:
    """Arrow decodes such a line strictly before its invalid-row handler sees it: the file was refused.
    Beside it, a line of the right width with invalid UTF-8 is quarantined in its column as before."""
    wrong = b"u3,1700000020,view,i\xff\xfe,c1,1,extra"
    right = b"u4,1700000030,view,i\xff,c1,1"
    long = b"u5,1700000040,view," + b"x" * (130 << 10) + b"\xff,c1,1"  # over Python csv's field limit
    lines = [g.encode() for g in GOOD]
    path = write(
        tmp_path / "bad.csv",
        HEADER.encode() + b"\n".join([*lines[:2], wrong, right, long, *lines[2:]]) + b"\n",
    )
    reader = read_all(path, quarantine_path=tmp_path / "q.csv")
    assert (reader.report.rows_in, reader.report.rows_kept, reader.report.rows_quarantined) == (7, 4, 3)
    rows = {row["line"]: row for row in quarantine_rows(tmp_path / "q.csv")}
    assert rows["4"]["reason"] == "wrong number of fields" and "\\xff\\xfe" in rows["4"]["record"]
    assert rows["5"]["reason"] == "invalid UTF-8" and rows["5"]["column"] == "item_id"
