"""One pass from a file to tokenizable sessions: read, validate, partition by user, count item popularity.

Every command that reads events (data check, train, score, client, simulate) goes through `ingest`, so
they all see the same rows, the same bad-row accounting and the same sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedanom.common.loader import BadRowPolicy, EventReader, LoadReport, Progress, is_gzip
from fedanom.common.presets import Preset
from fedanom.common.sessions import SessionBatch, SessionBuilder, SessionConfig
from fedanom.common.tokens import ItemCounter, Popularity


@dataclass
class Ingested:
    """The result of reading a file: its report, this shop's item popularity, and its sessions."""

    report: LoadReport
    popularity: Popularity
    builder: SessionBuilder

    def batches(self) -> Iterator[SessionBatch]:
        """Session batches, one partition at a time (iterate once)."""
        return self.builder.batches()


def ingest(
    path: str | Path,
    preset: Preset,
    *,
    config: SessionConfig | None = None,
    on_bad_rows: BadRowPolicy = "quarantine",
    quarantine_path: str | Path | None = None,
    popularity: Popularity | None = None,
    partition_bytes: int = 32 << 20,
    block_bytes: int = 16 << 20,
    encoding: str = "utf-8",
    progress: Progress | None = None,
) -> Ingested:
    """Read the whole file once. Popularity comes from the file itself, added to a reference when one
    is given (scoring later traffic against the popularity counted at training time)."""
    path = Path(path)
    reader = EventReader(
        path,
        preset,
        on_bad_rows=on_bad_rows,
        quarantine_path=quarantine_path,
        block_bytes=block_bytes,
        encoding=encoding,
        progress=progress,
    )
    size = path.stat().st_size if path.is_file() else 0
    compressed = size > 0 and (is_gzip(path) or path.suffix.lower() in (".parquet", ".pq"))
    builder = SessionBuilder(
        config or SessionConfig(), SessionBuilder.partitions_for(size, compressed, partition_bytes)
    )
    counter = ItemCounter()
    for table in reader:
        builder.add(table)
        counter.add(table.column("item").to_numpy())
    own = counter.popularity()
    return Ingested(
        report=reader.report,
        popularity=popularity.updated(own) if popularity is not None else own,
        builder=builder,
    )
