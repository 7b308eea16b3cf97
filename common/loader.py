"""Read a merchant's export (CSV, gzip'd CSV or Parquet) in bounded memory, losing no row.

`EventReader` streams the file in blocks and yields Arrow tables of canonical events (`EVENT_SCHEMA`).
Every row either comes out as an event or is quarantined with a reason, so after the stream ends
`report.rows_in == report.rows_kept + report.rows_quarantined` always holds. With `on_bad_rows="fail"`
the first bad row stops the read with one sentence naming the file, line, column and reason.

Line numbers are exact. A row whose field count is wrong never reaches Arrow's batches, so when a file
has any, one extra pass finds their lines and the stream index of every other row is mapped back through
them (`LoadReport.line_numbers`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from fedanom.common.columns import (
    MAX_TS_MS,
    MIN_TS_MS,
    hash_ids,
    parse_timestamps,
    present,
    to_float,
    to_utf8,
)
from fedanom.common.errors import FedanomError
from fedanom.common.events import EVENT_CODE, event_type_map
from fedanom.common.presets import Preset

BadRowPolicy = Literal["quarantine", "fail"]
Progress = Callable[[int, int], None]

EVENT_SCHEMA = pa.schema(
    [
        ("user", pa.uint64()),  # hash of the user id
        ("user_raw", pa.string()),
        ("ts", pa.int64()),  # Unix milliseconds
        ("etype", pa.int8()),  # standard event code
        ("item", pa.uint64()),
        ("cat", pa.uint64()),  # 0: no category
        ("sess", pa.uint64()),  # 0: no session id, sessionize by inactivity
        ("sess_raw", pa.string()),
        ("price", pa.float32()),  # NaN: no price
        ("row", pa.int64()),  # index among the rows Arrow parsed; LoadReport.line_numbers maps it to a line
    ]
)

WRONG_FIELD_COUNT = "wrong number of fields"
# No id, time, type or price is this long: such a field is a broken export (a lost delimiter, a binary blob)
MAX_FIELD_CHARS = 65_536
FIELD_TOO_LONG = f"field longer than {MAX_FIELD_CHARS:,} characters"
QUARANTINE_CHARS = 4_096  # a quarantined record or value is cut here, so one bad line cannot fill a disk
# Python's csv module (counting a bad line's fields) refuses fields over 128 KiB; such a field is for the
# quarantine to report (FIELD_TOO_LONG), not a reason to stop reading
csv.field_size_limit(2**31 - 1)


@dataclass
class LoadReport:
    """What a read saw: rows in, kept and quarantined by reason, and where the quarantine went."""

    path: Path
    unit: str = "line"  # "line" for CSV, "row" for Parquet
    first_line: int = 1
    rows_in: int = 0
    rows_kept: int = 0
    bad_rows: Counter[str] = field(default_factory=Counter)
    quarantine_path: Path | None = None
    # Stream positions at which rows with a wrong field count were dropped by the parser.
    insert_points: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def rows_quarantined(self) -> int:
        return sum(self.bad_rows.values())

    @property
    def conserved(self) -> bool:
        return self.rows_in == self.rows_kept + self.rows_quarantined

    def line_numbers(self, rows: np.ndarray) -> np.ndarray:
        """File line (CSV) or 1-based row (Parquet) of each stream row index."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.first_line + rows + np.searchsorted(self.insert_points, rows, side="right")


@dataclass
class BadRow:
    row: int  # stream row index, or -1 - k for the k-th row with a wrong field count
    reason: str
    column: str
    value: str
    record: str


class EventReader:
    """Iterate over a file's valid events as Arrow tables; `report` is complete once iteration ends."""

    def __init__(
        self,
        path: str | Path,
        preset: Preset,
        *,
        on_bad_rows: BadRowPolicy = "quarantine",
        quarantine_path: str | Path | None = None,
        block_bytes: int = 16 << 20,
        encoding: str = "utf-8",
        progress: Progress | None = None,
    ) -> None:
        self.path = Path(path)
        self.preset = preset
        self.on_bad_rows = on_bad_rows
        self.block_bytes = block_bytes
        self.encoding = encoding
        self.progress = progress
        self.event_codes = event_type_map(preset.extra_event_types)
        self.report = LoadReport(
            path=self.path, quarantine_path=Path(quarantine_path) if quarantine_path else None
        )
        self._bad: list[BadRow] = []
        self._wrong_field_rows: list[str] = []
        self._header: list[str] = []
        self._wrong_field_lines: list[int] = []
        self._cr_only = False  # classic Mac line ends: every CR is read as a line end

    # ----------------------------------------------------------------------------------------------- reading
    def __iter__(self) -> Iterator[pa.Table]:
        check_file(self.path)
        parquet = self.path.suffix.lower() in (".parquet", ".pq")
        batches = self._parquet_batches() if parquet else self._csv_batches()
        row0 = 0
        for batch in batches:
            table = self._convert(batch, row0)
            row0 += batch.num_rows
            self.report.rows_in += batch.num_rows
            self.report.rows_kept += table.num_rows
            if self.on_bad_rows == "fail" and (self._bad or self._wrong_field_rows):
                self._fail_at_first_bad_row()
            if table.num_rows:
                yield table
        if self._wrong_field_rows:
            self.report.rows_in += len(self._wrong_field_rows)
            self.report.bad_rows[WRONG_FIELD_COUNT] += len(self._wrong_field_rows)
        if self.report.rows_in == 0:
            raise FedanomError(f"{self.path} has a header but no data rows")
        self._resolve_wrong_field_lines()
        self._write_quarantine()
        if self.report.rows_kept == 0:
            reason, count = self.report.bad_rows.most_common(1)[0]
            where = f"; they are in {self.report.quarantine_path}" if self.report.quarantine_path else ""
            raise FedanomError(
                f"{self.path}: none of its {self.report.rows_in} rows is a valid event "
                f"(most common problem: {reason}, {count} rows){where}"
            )

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        """Parse the file one block of whole lines at a time.

        Arrow's own streaming reader buffers blocks far ahead of a slower consumer (most of a 300 MB file
        was seen resident), so blocks are cut here at line ends and each is parsed with Arrow's
        multi-threaded reader: memory is bounded by one block and parsing still uses every core.
        Quoted newlines are not allowed, so a line end always ends a row.
        """
        self._header = self._read_header()
        preset = self.preset  # as adapted to the header
        self.report.first_line = 2 if preset.header else 1
        raw = pa.OSFile(str(self.path))
        gz = is_gzip(self.path)
        stream = pa.CompressedInputStream(raw, "gzip") if gz else raw
        total = self.path.stat().st_size

        def on_invalid(row: pcsv.InvalidRow) -> str:
            self._wrong_field_rows.append(row.text)
            return "skip"

        read_options = pcsv.ReadOptions(column_names=self._header, encoding=self.encoding)
        long_lines = pcsv.ReadOptions(column_names=self._header, encoding=self.encoding)
        parse_options = pcsv.ParseOptions(
            delimiter=preset.sep, invalid_row_handler=on_invalid, ignore_empty_lines=False
        )
        convert_options = pcsv.ConvertOptions(column_types={c: pa.binary() for c in self._header})
        rows, carry, skip_header = 0, b"", preset.header

        def stopped(because: str) -> FedanomError:
            return FedanomError(f"{self.path}: reading stopped after about {rows} rows because {because}")

        while True:
            try:
                data = stream.read(self.block_bytes)
            except (OSError, EOFError):
                raise stopped("the gzip data is truncated or corrupt") from None
            if self._cr_only:
                data = data.replace(b"\r", b"\n")
            block, carry = _whole_lines(carry + data) if data else (carry, b"")
            if skip_header and block:
                newline = block.find(b"\n")
                block, skip_header = (block[newline + 1 :] if newline >= 0 else b""), False
            if block and codecs.lookup(self.encoding).name == "utf-8" and not _is_utf8(block):
                block = _escape_bad_utf8_on_wrong_width_lines(block, preset.sep, len(self._header))
            if block:
                try:
                    # Arrow parses in 1 MiB chunks on every core; a longer line needs one chunk for the block
                    options = read_options if _longest_line(block) < read_options.block_size else long_lines
                    long_lines.block_size = len(block) + 1
                    table = pcsv.read_csv(
                        pa.py_buffer(block),
                        read_options=options,
                        parse_options=parse_options,
                        convert_options=convert_options,
                    )
                except pa.ArrowInvalid as exc:
                    raise stopped(f"it cannot be parsed ({exc})") from None
                for batch in table.combine_chunks().to_batches():
                    rows += batch.num_rows
                    yield batch
                if self.progress:
                    self.progress(raw.tell(), total)
            if not data:
                return

    def _read_header(self) -> list[str]:
        """The file's column names, checked against the preset, from its first line."""
        preset = self.preset
        opener = gzip.open if is_gzip(self.path) else open
        try:
            with opener(self.path, "rb") as fh:
                first = fh.readline()
        except (OSError, EOFError):
            raise FedanomError(f"{self.path}: the gzip data is truncated or corrupt at its start") from None
        if b"\r" in first.rstrip(b"\r\n"):  # no LF ends the first line: the file ends lines with CR alone
            self._cr_only, first = True, first.split(b"\r")[0]
        try:
            line = first.decode(self.encoding).rstrip("\r\n")
        except UnicodeDecodeError:
            raise FedanomError(
                f"{self.path}: line 1 is not valid {self.encoding} text; pass --encoding (e.g. latin-1)"
            ) from None
        if not line.strip():
            raise FedanomError(f"{self.path} is empty (its first line is blank)")
        if len(line) > MAX_FIELD_CHARS:
            raise FedanomError(
                f"{self.path}: line 1 cannot be read: it is {len(line):,} characters long, and the first "
                f"line holds the column names or the first event"
            )
        try:
            fields = next(csv.reader([line], delimiter=preset.sep))
        except csv.Error as exc:
            raise FedanomError(f"{self.path}: line 1 cannot be read as delimited fields ({exc})") from None
        if not preset.header:
            if len(fields) != len(preset.column_names):
                raise FedanomError(
                    f"{self.path}: line 1 has {len(fields)} fields but the {preset.name} preset expects "
                    f"{len(preset.column_names)} ({', '.join(preset.column_names)})"
                    f"{_delimiter_hint(line, preset.sep)}"
                )
            return list(preset.column_names)
        self.preset = preset = preset.for_columns(fields)
        missing = [c for c in preset.source_columns() if c not in fields]
        if missing:
            shown = ", ".join(fields[:12]) + (", ..." if len(fields) > 12 else "")
            raise FedanomError(
                f"{self.path}: line 1 (the header) has no column '{missing[0]}' needed by the {preset.name} "
                f"preset (columns found: {shown}){_delimiter_hint(line, preset.sep)}"
            )
        return fields

    def _parquet_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FedanomError(f"{self.path} is not a readable Parquet file ({exc})") from None
        self.report.unit = "row"
        names = pf.schema_arrow.names
        self.preset = self.preset.for_columns(names)
        missing = [c for c in self.preset.source_columns() if c not in names]
        if missing:
            raise FedanomError(
                f"{self.path} has no column '{missing[0]}' (columns found: {', '.join(names)})"
            )
        self._header = names
        done, total = 0, pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=1 << 18):
            done += batch.num_rows
            if self.progress:
                self.progress(done, total)
            yield batch

    def validate(self, batch: pa.RecordBatch, row0: int = 0) -> tuple[pa.Table, list[BadRow]]:
        """Rows that arrive without a file (`fedanom serve`'s requests), checked as a file's are: the
        valid ones as canonical events, and every bad one with its reason; nothing is kept between calls."""
        table = self._convert(batch, row0)
        bad, self._bad = self._bad, []
        return table, bad

    # -------------------------------------------------------------------------------------------- converting
    def _convert(self, batch: pa.RecordBatch, row0: int) -> pa.Table:
        """Validate one batch; return its valid rows as canonical events and record the bad ones."""
        preset, n = self.preset, batch.num_rows
        reasons: list[str] = []
        reason = np.zeros(n, dtype=np.int8)  # 0: good, k: reasons[k - 1]
        column = np.full(n, "", dtype=object)

        def flag(mask: np.ndarray, why: str, col: str) -> None:
            new = mask & (reason == 0)
            if new.any():
                reasons.append(why)
                reason[new] = len(reasons)
                column[new] = col

        text: dict[str, pa.Array] = {}
        used = set(preset.source_columns())
        for name in batch.schema.names:
            col = batch.column(name)
            if pa.types.is_dictionary(col.type):  # pandas categoricals, Spark's dictionary pages
                col = col.dictionary_decode()
            if pa.types.is_nested(col.type):
                if name in used:
                    raise FedanomError(
                        f"{self.path}: column '{name}' holds {col.type} values, not one value per row; "
                        "fedanom reads ids, times, event types and prices as plain values"
                    )
                continue  # a list or struct column fedanom does not read
            if pa.types.is_binary(col.type):
                text[name], not_utf8 = to_utf8(col)
                flag(not_utf8, "invalid UTF-8", name)
            elif pa.types.is_timestamp(col.type) or pa.types.is_string(col.type):
                text[name] = col
            else:
                text[name] = col.cast(pa.string())
        filled = {name: present(col) for name, col in text.items() if pa.types.is_string(col.type)}
        for name in used & set(filled):
            length = pc.fill_null(pc.utf8_length(text[name]), 0)
            flag(np.asarray(pc.greater(length, MAX_FIELD_CHARS), dtype=bool), FIELD_TOO_LONG, name)
        if filled:
            flag(~np.logical_or.reduce(list(filled.values())), "empty line", batch.schema.names[0])
        if self._header and preset.header:
            same = [
                np.asarray(pc.fill_null(pc.equal(text[c], c), False))
                for c in self._header
                if c in text and pa.types.is_string(text[c].type)  # a native timestamp is never a header
            ]
            if same:
                flag(np.logical_and.reduce(same), "repeated header line", self._header[0])

        def source(field_name: str) -> str:
            return preset.columns[field_name]

        user = text[source("user_id")]
        has_user = filled[source("user_id")]
        if preset.user_id_fallback:
            user = pc.if_else(pa.array(has_user), user, text[source(preset.user_id_fallback)])
            has_user = present(user)
        flag(~has_user, "missing user_id", source("user_id"))
        item = text[source("item_id")]
        flag(~filled[source("item_id")], "missing item_id", source("item_id"))

        ts_col = text[source("timestamp")]
        if pa.types.is_timestamp(ts_col.type):
            ts = np.asarray(
                pc.fill_null(ts_col.cast(pa.timestamp("ms")).cast(pa.int64()), -1), dtype=np.int64
            )
        else:
            flag(~filled[source("timestamp")], "missing timestamp", source("timestamp"))
            offset = text[preset.timestamp_offset] if preset.timestamp_offset else None
            ts = parse_timestamps(ts_col, preset.timestamp_format, offset)
        flag(ts == -1, "unparseable timestamp", source("timestamp"))
        flag(
            (ts != -1) & ((ts < MIN_TS_MS) | (ts >= MAX_TS_MS)), "timestamp out of range", source("timestamp")
        )

        if preset.constant_event_type:
            etype = np.full(n, EVENT_CODE[preset.constant_event_type], dtype=np.int8)
        else:
            etype = self._event_codes(text[source("event_type")])
            flag(etype == -2, "missing event_type", source("event_type"))
            flag(etype == -1, "unknown event type", source("event_type"))

        price = np.full(n, np.nan, dtype=np.float32)
        if "price" in preset.columns:
            price_text = text[source("price")]
            has_price = filled[source("price")]
            value = to_float(price_text)
            flag(has_price & ~(np.isfinite(value) & (value >= 0)), "bad price", source("price"))
            price = np.where(has_price, value, np.nan).astype(np.float32)

        good = reason == 0
        if not good.all():
            why = np.array(["", *reasons], dtype=object)[reason]
            self._record_bad(batch, text, np.nonzero(~good)[0], row0, why, column)
        keep = pa.array(good)

        def kept(col: pa.Array) -> pa.Array:  # only kept rows are hashed: a bad row's field may be huge
            return pc.if_else(keep, col, pa.scalar(None, pa.string()))

        def optional_ids(field_name: str) -> tuple[np.ndarray, pa.Array]:
            if field_name not in preset.columns:
                return np.zeros(n, dtype=np.uint64), pa.nulls(n, pa.string())
            col = text[source(field_name)]
            col = pc.if_else(pa.array(filled[source(field_name)]), col, pa.scalar(None, pa.string()))
            return hash_ids(kept(col)), col

        cat, _ = optional_ids("category")
        sess, sess_raw = optional_ids("session_id")
        columns = [
            hash_ids(kept(user)),
            user,
            ts,
            etype,
            hash_ids(kept(item)),
            cat,
            sess,
            sess_raw,
            price,
            np.arange(row0, row0 + n, dtype=np.int64),
        ]
        table = pa.Table.from_arrays(
            [pa.array(c) if isinstance(c, np.ndarray) else c for c in columns], schema=EVENT_SCHEMA
        )
        return table.filter(keep) if not good.all() else table

    def _event_codes(self, col: pa.Array) -> np.ndarray:
        """Standard event code per row; -1 unknown type, -2 blank."""
        encoded = pc.dictionary_encode(pc.utf8_lower(pc.utf8_trim_whitespace(col)))
        names = encoded.dictionary.to_pylist()
        lookup = np.array(
            [self.event_codes.get(v, -2 if v == "" else -1) for v in names] + [-2], dtype=np.int8
        )
        indices = np.asarray(pc.fill_null(encoded.indices, len(names)), dtype=np.int64)
        return lookup[indices]

    # --------------------------------------------------------------------------------------------- bad rows
    def _record_bad(
        self,
        batch: pa.RecordBatch,
        text: dict[str, pa.Array],
        idx: np.ndarray,
        row0: int,
        reason: np.ndarray,
        column: np.ndarray,
    ) -> None:
        records = batch.take(pa.array(idx)).to_pylist()
        for i, record in zip(idx, records, strict=True):
            col = str(column[i])
            value = text[col][int(i)].as_py() if col in text else None
            self._bad.append(
                BadRow(
                    row=row0 + int(i),
                    reason=str(reason[i]),
                    column=col,
                    value=_cut("" if value is None else str(value)),
                    record=_cut(self.preset.sep.join(_field_text(v) for v in record.values())),
                )
            )
            self.report.bad_rows[str(reason[i])] += 1
            if self.on_bad_rows == "fail":
                return

    def _fail_at_first_bad_row(self) -> None:
        self._resolve_wrong_field_lines()
        first = min(self._bad_rows_with_lines(), key=lambda item: item[0])
        line, bad = first
        value = f" ('{bad.value}')" if bad.value else ""
        raise FedanomError(
            f"{self.path}: {self.report.unit} {line}, column '{bad.column}': {bad.reason}{value} "
            f"(stopped because --on-bad-rows fail)"
        )

    def _resolve_wrong_field_lines(self) -> None:
        """Find the lines of rows dropped for a wrong field count, and fold them into the bad rows."""
        if not self._wrong_field_rows or self._wrong_field_lines:
            return
        lines = _lines_with_wrong_field_count(
            self.path, self.preset, len(self._header), len(self._wrong_field_rows), self.encoding
        )
        first = self.report.first_line
        self.report.insert_points = np.array([ln - first - k for k, ln in enumerate(lines)], dtype=np.int64)
        for k, text in enumerate(self._wrong_field_rows):
            self._bad.append(
                BadRow(
                    row=-1 - k, reason=WRONG_FIELD_COUNT, column="", value=str(len(self._header)), record=text
                )
            )
        self._wrong_field_lines = lines

    def _bad_rows_with_lines(self) -> list[tuple[int, BadRow]]:
        stream = np.array([b.row for b in self._bad if b.row >= 0], dtype=np.int64)
        stream_lines = iter(self.report.line_numbers(stream).tolist())
        wrong = self._wrong_field_lines
        return [(wrong[-1 - b.row] if b.row < 0 else next(stream_lines), b) for b in self._bad]

    def _write_quarantine(self) -> None:
        target = self.report.quarantine_path
        if target is None or not self._bad:
            if target is not None and _is_quarantine(target):  # an earlier read's, no longer true
                target.unlink()
            self.report.quarantine_path = None
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([self.report.unit, "reason", "column", "value", "record"])
            for line, bad in sorted(self._bad_rows_with_lines(), key=lambda item: item[0]):
                writer.writerow([line, bad.reason, bad.column, bad.value, bad.record])


def _is_quarantine(path: Path) -> bool:
    """Whether a file is a quarantine this reader wrote (its header), so that only such a file is removed."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.readline().rstrip(b"\r\n").split(b",")[1:] == [b"reason", b"column", b"value", b"record"]


def _whole_lines(data: bytes) -> tuple[bytes, bytes]:
    """(the complete lines in data, the unfinished last line)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def check_file(path: Path) -> None:
    """One sentence if `path` cannot be an events file at all: missing, not a file, or empty."""
    if not path.exists():
        raise FedanomError(f"{path} does not exist")
    if not path.is_file():
        raise FedanomError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise FedanomError(f"{path} is empty")


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _cut(text: str) -> str:
    if len(text) <= QUARANTINE_CHARS:
        return text
    return f"{text[:QUARANTINE_CHARS]}... ({len(text):,} characters)"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _escape_bad_utf8_on_wrong_width_lines(block: bytes, sep: str, width: int) -> bytes:
    """Arrow decodes a line with the wrong field count strictly before its invalid-row handler sees it,
    so one such line that was also not UTF-8 stopped the whole file. Its bad bytes are escaped
    (backslashreplace) so it is quarantined for its field count like any other; a line of the right width
    keeps its bytes and is quarantined as invalid UTF-8 in its column."""
    lines = block.split(b"\n")
    for k, line in enumerate(lines):
        if not _is_utf8(line):
            text = line.decode("utf-8", errors="backslashreplace")
            if len(next(csv.reader([text.rstrip("\r")], delimiter=sep))) != width:
                lines[k] = text.encode("utf-8")
    return b"\n".join(lines)


def _longest_line(block: bytes) -> int:
    ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
    return int(np.diff(ends, prepend=-1).max()) if len(ends) else len(block)


def _field_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return "" if value is None else str(value)


def _delimiter_hint(line: str, sep: str) -> str:
    for candidate in (",", ";", "\t", "|"):
        if candidate != sep and line.count(candidate) >= 1 and line.count(sep) == 0:
            shown = "\\t" if candidate == "\t" else candidate
            return f"; it looks separated by '{shown}', so pass --sep '{shown}' or the right --preset"
    return ""


def _lines_with_wrong_field_count(
    path: Path, preset: Preset, width: int, limit: int, encoding: str
) -> list[int]:
    """Line numbers (1-based) of the first `limit` data lines whose field count differs from `width`."""
    opener = gzip.open if is_gzip(path) else open
    found: list[int] = []
    with opener(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")
        for number, line in enumerate(text, start=1):
            if number == 1 and preset.header:
                continue
            line = line.rstrip("\r\n")
            if line and len(next(csv.reader([line], delimiter=preset.sep))) != width:
                found.append(number)
                if len(found) == limit:
                    break
    return found
