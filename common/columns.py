"""Column kernels the loader applies to each chunk: UTF-8 validation, id hashing, timestamp parsing.

Each kernel has a fast path that handles a clean chunk in vectorised Arrow/NumPy code and an exact
per-element path taken only for a chunk that the fast path rejects, so a clean file pays nothing for the
rows-in = rows-kept + rows-quarantined guarantee.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Timestamps outside [1990, 2100) are typos or unit mistakes, not shop traffic.
MIN_TS_MS = 631_152_000_000
MAX_TS_MS = 4_102_444_800_000

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def to_utf8(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary column -> string column, and a mask of the rows whose bytes are not valid UTF-8 (now null)."""
    try:
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        values = col.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        text: list[str | None] = []
        for i, v in enumerate(values):
            try:
                text.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                text.append(None)
        return pa.array(text, type=pa.string()), bad


def present(col: pa.Array) -> np.ndarray:
    """Rows holding a non-blank value."""
    trimmed = pc.utf8_trim_whitespace(col)
    return np.asarray(pc.fill_null(pc.greater(pc.utf8_length(trimmed), 0), False), dtype=bool)


def hash_ids(col: pa.Array) -> np.ndarray:
    """Stable 64-bit hash (FNV-1a + a final mix) of each string; 0 for null.

    Ids are hashed, never parsed, so "007" and "7" stay different users, an int64 Parquet column and the
    same ids read from CSV agree, and no raw id needs to be kept to group events.
    """
    if not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    n = len(col)
    if n == col.null_count:
        return np.zeros(n, dtype=np.uint64)
    offsets_buf, data_buf = col.buffers()[1], col.buffers()[2]
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=col.offset * 4).astype(np.int64)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)
        if data_buf is not None and data_buf.size
        else np.zeros(1, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    if col.null_count:  # a null slot may still span bytes (a value masked out after parsing): skip them
        lengths[np.asarray(col.is_null())] = 0
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    active = np.nonzero(lengths > 0)[0]
    j = 0
    while active.size:
        h[active] = (h[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
        j += 1
        active = active[lengths[active] > j]
    h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h[h == 0] = 1
    if col.null_count:
        h[np.asarray(col.is_null())] = 0
    return h


def to_float(col: pa.Array) -> np.ndarray:
    """String column -> float64, NaN where the text is not a number (or was null)."""
    try:
        return np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pd.to_numeric(pd.Series(col.to_pylist(), dtype=object), errors="coerce").to_numpy(np.float64)


def parse_timestamps(col: pa.Array, fmt: str, offset_ms: pa.Array | None = None) -> np.ndarray:
    """Parse a timestamp column to int64 Unix milliseconds; -1 marks a value that cannot be parsed.

    `fmt` is `unix_s`, `unix_ms`, `auto`, `date+offset_ms` or a strptime pattern (see presets).
    """
    if fmt in ("unix_s", "unix_ms"):
        scale = 1000.0 if fmt == "unix_s" else 1.0
        return _finite_ms(to_float(col) * scale)
    if fmt == "auto":
        numbers = to_float(col)
        ms = np.where(np.abs(numbers) >= 1e11, numbers, numbers * 1000.0)
        text_rows = np.isnan(numbers)
        if text_rows.any():
            ms[text_rows] = _iso_ms(col.filter(pa.array(text_rows)))
        return _finite_ms(ms)
    if fmt == "date+offset_ms":
        days = pc.strptime(col, format="%Y-%m-%d", unit="ms", error_is_null=True)
        base = np.asarray(pc.fill_null(days.cast(pa.int64()), -1), dtype=np.int64)
        offset = to_float(offset_ms) if offset_ms is not None else np.zeros(len(col))
        ms = np.where((base >= 0) & np.isfinite(offset), base + offset, np.nan)
        return _finite_ms(ms)
    parsed = pc.strptime(col, format=fmt, unit="ms", error_is_null=True)
    return np.asarray(pc.fill_null(parsed.cast(pa.int64()), -1), dtype=np.int64)


def _iso_ms(col: pa.Array) -> np.ndarray:
    parsed = pd.to_datetime(
        pd.Series(col.to_pylist(), dtype=object), errors="coerce", utc=True, format="ISO8601"
    )
    valid = parsed.notna().to_numpy()
    ms = np.full(len(parsed), np.nan)
    ms[valid] = parsed[valid].dt.as_unit("ms").astype("int64").to_numpy()
    return ms


def _finite_ms(ms: np.ndarray) -> np.ndarray:
    ok = np.isfinite(ms)
    out = np.full(len(ms), -1, dtype=np.int64)
    out[ok] = np.rint(ms[ok]).astype(np.int64)
    return out
