"""Events that arrive one request at a time (JSON objects), checked as an export's rows are.

`fedanom serve` takes the merchant's own column names, so a request's events go through the same
`EventReader` (preset, --map, timestamp format, checks) as a file's rows. A record that is no event at
all (not an object, a nested value, an NDJSON line that did not parse) is rejected here in its place,
so every rejection keeps the position the caller sent it at. A body that holds no events at all is
refused whole (`BadBody`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedanom.common.errors import FedanomError
from fedanom.common.loader import EventReader
from fedanom.common.presets import Preset

REQUEST = Path("request")  # what a bad event's sentence names instead of a file


class BadBody(FedanomError):
    """A request body that holds no events at all: not UTF-8, or not JSON."""


def parse_body(body: bytes, content_type: str) -> list[Any]:
    """The events of a body: NDJSON (one event per line) or JSON (one event, or an array of them)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"the body is not UTF-8 (byte {exc.start})") from None
    if "ndjson" in content_type or "jsonl" in content_type:
        records: list[Any] = []
        for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028 and its kin
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:  # rejected in its place; the other lines are scored
                    records.append(exc)
        return records
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadBody(f"the body is not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # a body of nothing but brackets
        raise BadBody("the body nests JSON deeper than any event does") from None
    return parsed if isinstance(parsed, list) else [parsed]


class RequestReader:
    """A request's records as checked events, and the rejected ones with position, field and reason."""

    def __init__(self, preset: Preset) -> None:
        self.reader = EventReader(REQUEST, preset)

    def read(self, records: Sequence[object]) -> tuple[pa.Table, list[dict[str, Any]]]:
        columns = self.reader.preset.source_columns()
        rejected: list[dict[str, Any]] = []
        plain: list[dict[str, str | None]] = []
        for i, record in enumerate(records):
            why = _not_an_event(record, columns)
            if why is None and isinstance(record, Mapping):
                plain.append({c: _text(record.get(c)) for c in columns})
            else:
                rejected.append({"index": i, **(why or {})})
                plain.append(dict.fromkeys(columns))  # kept in place so positions stay the request's
        batch = pa.RecordBatch.from_pydict({c: pa.array([p[c] for p in plain], pa.string()) for c in columns})
        table, bad = self.reader.validate(batch, row0=1)  # rows count from 1, as an NDJSON body's lines
        early = {r["index"] for r in rejected}
        keep = np.array([int(r) - 1 not in early for r in table.column("row").to_numpy()], dtype=bool)
        rejected += [
            {"index": b.row - 1, "field": b.column, "reason": b.reason} for b in bad if b.row - 1 not in early
        ]
        rejected.sort(key=lambda r: r["index"])
        return table.filter(pa.array(keep)), rejected


def _not_an_event(record: object, columns: Iterable[str]) -> dict[str, str] | None:
    if isinstance(record, ValueError):  # a line of an NDJSON body that did not parse
        return {"field": "", "reason": f"not JSON ({record})"}
    if not isinstance(record, Mapping):
        return {"field": "", "reason": f"an event is a JSON object, not {type(record).__name__}"}
    for column in columns:
        if isinstance(record.get(column), (dict, list)):
            return {"field": column, "reason": "holds a JSON object or list, not one value"}
    return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
