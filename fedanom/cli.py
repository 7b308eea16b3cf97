"""The `fedanom` command: one entry point for merchants, operators and researchers.

User mistakes raise `FedanomError` anywhere below; `run` turns them into one red sentence on stderr and
exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table

from fedanom.common.check import DataSummary, summarize
from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.presets import PRESETS, resolve_preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.tokens import VOCAB_VERSION

app = typer.Typer(
    name="fedanom",
    help="Federated anomaly detection for e-commerce behaviour.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect a merchant's event export.", no_args_is_help=True)
app.add_typer(data_app, name="data")
err = Console(stderr=True)

PresetOption = Annotated[
    str | None, typer.Option("--preset", "-p", help=f"Export format: {', '.join(PRESETS)}; omit for --map.")
]
MapOption = Annotated[
    str | None,
    typer.Option(
        "--map",
        help="Column mapping FIELD=COLUMN,... (fields: user_id, timestamp, event_type, item_id, session_id, "
        "category, price); event_type=const:view for a log with no event column.",
    ),
]
SepOption = Annotated[
    str | None, typer.Option("--sep", help="Field delimiter (default: the preset's, else ',').")
]
TimestampOption = Annotated[
    str | None, typer.Option("--timestamp-format", help="auto, unix_s, unix_ms or a strptime pattern.")
]
EventTypeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--event-type", help="Declare a custom event type: NAME=STANDARD, or NAME (-> other). Repeatable."
    ),
]
BadRowsOption = Annotated[
    str,
    typer.Option("--on-bad-rows", help="quarantine: set bad rows aside in a file; fail: stop at the first."),
]
QuarantineOption = Annotated[
    Path | None, typer.Option("--quarantine", help="Where bad rows go (default: ./<file>.quarantine.csv).")
]
GapOption = Annotated[float, typer.Option("--session-gap", help="Minutes of inactivity that end a session.")]
WindowOption = Annotated[int, typer.Option("--window", help="Most events in one scored window.")]
EncodingOption = Annotated[str, typer.Option("--encoding", help="Text encoding of a CSV file.")]


@data_app.command("check")
def data_check(
    file: Annotated[Path, typer.Argument(help="Events file: CSV, CSV.gz or Parquet.")],
    preset: PresetOption = None,
    mapping: MapOption = None,
    sep: SepOption = None,
    timestamp_format: TimestampOption = None,
    event_type: EventTypeOption = None,
    on_bad_rows: BadRowsOption = "quarantine",
    quarantine: QuarantineOption = None,
    session_gap: GapOption = 30.0,
    window: WindowOption = 128,
    encoding: EncodingOption = "utf-8",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Is my export readable, what is in it, and which rows are bad and why."""
    if on_bad_rows not in ("quarantine", "fail"):
        raise FedanomError(f"--on-bad-rows must be quarantine or fail, not '{on_bad_rows}'")
    spec = resolve_preset(
        preset,
        mapping=mapping,
        sep=sep,
        timestamp_format=timestamp_format,
        event_types=tuple(event_type or ()),
    )
    if session_gap <= 0 or window < 2:
        raise FedanomError("--session-gap must be positive and --window at least 2")
    with _progress(f"reading {file.name}", enabled=not as_json) as report_progress:
        ingested = ingest(
            file,
            spec,
            config=SessionConfig(gap_minutes=session_gap, window=window),
            on_bad_rows="fail" if on_bad_rows == "fail" else "quarantine",
            quarantine_path=quarantine or Path.cwd() / f"{file.name}.quarantine.csv",
            encoding=encoding,
            progress=report_progress,
        )
        summary = summarize(ingested, spec.name, VOCAB_VERSION)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)


def _progress(description: str, *, enabled: bool) -> _ByteProgress:
    return _ByteProgress(description, enabled=enabled and err.is_terminal)


class _ByteProgress:
    """A rich progress bar over bytes read, shown only on a terminal."""

    def __init__(self, description: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=err, transient=True, disable=not enabled,
        )  # fmt: skip
        self.task = self.bar.add_task(description, total=None)

    def __enter__(self) -> _ByteProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)


def _print_summary(s: DataSummary) -> None:
    out = Console()
    overview = Table(title=f"{s.file} ({s.preset})", show_header=False)
    overview.add_row("rows in", f"{s.rows_in:,}")
    overview.add_row("rows kept", f"{s.rows_kept:,}")
    overview.add_row("rows quarantined", f"{s.rows_quarantined:,}")
    overview.add_row("in = kept + quarantined", "yes" if s.rows_conserved else "[red]NO[/red]")
    overview.add_row("users", f"{s.users:,}")
    overview.add_row("sessions / windows", f"{s.sessions:,} / {s.windows:,}")
    overview.add_row("time span", f"{s.first_event} .. {s.last_event} ({s.span_hours:,.2f} h)")
    overview.add_row(
        "distinct behaviour tokens", f"{s.distinct_tokens:,} (vocabulary {s.vocabulary_version})"
    )
    out.print(overview)
    mix = Table(title="event mix")
    mix.add_column("event")
    mix.add_column("count", justify="right")
    mix.add_column("share", justify="right")
    for name, count in s.event_mix.items():
        mix.add_row(name, f"{count:,}", f"{count / max(s.rows_kept, 1):.1%}")
    out.print(mix)
    dist = Table(title="distributions")
    dist.add_column("")
    for label in s.session_events:
        dist.add_column(label, justify="right")
    for title, values in (
        ("events per session", s.session_events),
        ("session minutes", s.session_minutes),
        ("gap between events, s (histogram)", s.gap_seconds),
    ):
        if values:
            dist.add_row(title, *(f"{v:,.3g}" for v in values.values()))
    out.print(dist)
    if s.bad_rows:
        bad = Table(title="bad rows by reason")
        bad.add_column("reason")
        bad.add_column("rows", justify="right")
        for reason, count in s.bad_rows.items():
            bad.add_row(reason, f"{count:,}")
        out.print(bad)
        out.print(f"quarantined rows written to {s.quarantine_file}")
    for note in s.notes:
        out.print(f"[yellow]note:[/yellow] {note}")


def _not_built(command: str, issue: int) -> None:
    @app.command(
        command,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help=f"(not built yet: issue #{issue})",
    )
    def _placeholder() -> None:
        raise FedanomError(f"`fedanom {command}` is not built yet (tracked in issue #{issue})")


for _command, _issue in (
    ("pretrain", 3),
    ("train", 3),
    ("score", 3),
    ("client", 4),
    ("server", 4),
    ("simulate", 5),
):
    _not_built(_command, _issue)


def run() -> None:
    """Console entry point."""
    try:
        app()
    except FedanomError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
