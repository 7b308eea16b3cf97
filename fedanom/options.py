"""The options every data-reading command shares, declared once.

`with_data_options` adds them to a typer command's signature and hands the command one `DataSource`,
so `data check`, `train`, `score` and `pretrain` read files identically and their flags cannot drift.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from fedanom.common.errors import FedanomError
from fedanom.common.ingest import Ingested, ingest
from fedanom.common.loader import BadRowPolicy
from fedanom.common.prepared import Prepared, prepare
from fedanom.common.presets import PRESETS, Preset, resolve_preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.tokens import Popularity

err = Console(stderr=True, soft_wrap=True)  # one message, one line (logs get grepped)
F = TypeVar("F", bound=Callable[..., Any])


# How a merchant's events are named and written, for files and served events alike.
PresetOption = Annotated[
    str | None,
    typer.Option("--preset", "-p", help=f"Export format: {', '.join(PRESETS)}; omit for --map."),
]
MapOption = Annotated[
    str | None,
    typer.Option(
        "--map",
        help="Column mapping FIELD=COLUMN,... (fields: user_id, timestamp, event_type, item_id, "
        "session_id, category, price); event_type=const:view for a log with no event column.",
    ),
]
TimestampFormatOption = Annotated[
    str | None, typer.Option("--timestamp-format", help="auto, unix_s, unix_ms or a strptime pattern.")
]
EventTypeOption = Annotated[
    list[str] | None,
    typer.Option("--event-type", help="Declare a custom event type: NAME=STANDARD, or NAME (-> other)."),
]


@dataclass
class DataSource:
    """An events file and how to read it."""

    data: Annotated[Path, typer.Option("--data", "-d", help="Events file: CSV, CSV.gz or Parquet.")]
    preset: PresetOption = None
    mapping: MapOption = None
    sep: Annotated[
        str | None, typer.Option("--sep", help="Field delimiter (default: the preset's, else ',').")
    ] = None
    timestamp_format: TimestampFormatOption = None
    event_type: EventTypeOption = None
    on_bad_rows: Annotated[
        str,
        typer.Option(
            "--on-bad-rows", help="quarantine: set bad rows aside in a file; fail: stop at the first."
        ),
    ] = "quarantine"
    quarantine: Annotated[
        Path | None, typer.Option("--quarantine", help="Where bad rows go (default: beside the output).")
    ] = None
    encoding: Annotated[str, typer.Option("--encoding", help="Text encoding of a CSV file.")] = "utf-8"

    def read(
        self,
        *,
        default_quarantine: Path,
        config: SessionConfig | None = None,
        popularity: Popularity | None = None,
        show_progress: bool = True,
    ) -> Ingested:
        """Ingest the file (validated, partitioned, popularity counted) with a progress bar."""
        with progress_bar(f"reading {self.data.name}", enabled=show_progress) as bar:
            return ingest(
                self.data,
                self.resolved_preset(),
                config=config,
                on_bad_rows=self.bad_row_policy(),
                quarantine_path=self.quarantine or default_quarantine,
                popularity=popularity,
                encoding=self.encoding,
                progress=bar.update_bytes,
            )

    def prepare(self, state_dir: Path) -> Prepared:
        """A merchant's windows, prepared once into its state directory (`common.prepared`), so its
        federation's first message finds them ready; the file's mistakes are reported here first."""
        with progress_bar(f"preparing {self.data.name}") as bar:
            return prepare(
                self.data,
                self.resolved_preset(),
                state_dir,
                on_bad_rows=self.bad_row_policy(),
                quarantine_path=self.quarantine,
                progress=bar.update_bytes,
            )

    def resolved_preset(self) -> Preset:
        return resolve_preset(
            self.preset,
            mapping=self.mapping,
            sep=self.sep,
            timestamp_format=self.timestamp_format,
            event_types=tuple(self.event_type or ()),
        )

    def bad_row_policy(self) -> BadRowPolicy:
        if self.on_bad_rows not in ("quarantine", "fail"):
            raise FedanomError(f"--on-bad-rows must be quarantine or fail, not '{self.on_bad_rows}'")
        return "fail" if self.on_bad_rows == "fail" else "quarantine"

    @property
    def preset_name(self) -> str:
        return self.preset or "generic"


_SOURCE_FIELDS = [f.name for f in fields(DataSource)]

# Options several commands share, declared once so their flags and help cannot drift apart.
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda if present).")]
EpsilonOption = Annotated[float, typer.Option("--epsilon", help="This merchant's total privacy budget ε.")]
PrivacyUnitOption = Annotated[
    str,
    typer.Option(
        "--privacy-unit",
        help="What DP protects as one: user (a shopper, all their sessions) or session (one scored window).",
    ),
]
MaxWindowsPerUserOption = Annotated[
    int,
    typer.Option(
        "--max-windows-per-user", help="With --privacy-unit user: a sampled shopper's windows, at most."
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option("--verbose", help="Flower's (and Ray's) logs on the console instead of their log file."),
]
SessionGapOption = Annotated[
    float, typer.Option("--session-gap", help="Minutes of inactivity ending a session.")
]
WindowOption = Annotated[int, typer.Option("--window", help="Most events in one scored window.")]
ScoringAlertRateOption = Annotated[
    float | None,
    typer.Option("--alert-rate", help="Share of normal sessions to flag (default: the detector's)."),
]
StateDirOption = Annotated[
    Path,
    typer.Option(
        "--state-dir", help="This merchant's privacy ledger (and latest global detector) live here."
    ),
]


def data_options(*, file_argument: bool = False) -> Callable[[F], F]:
    """Give a command the DataSource options; it receives them as its `source` argument.

    With `file_argument` the events file is a positional FILE instead of `--data`.
    """
    return functools.partial(_add_data_options, file_argument=file_argument)


def _add_data_options(command: F, *, file_argument: bool) -> F:
    signature = inspect.signature(command, eval_str=True)  # typer cannot resolve the strings later
    own = [p for name, p in signature.parameters.items() if name != "source"]
    hints = inspect.get_annotations(DataSource, eval_str=True)
    shared = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[f.name],
            default=inspect.Parameter.empty if f.default is MISSING else f.default,
        )
        for f in fields(DataSource)
    ]
    if file_argument:
        file_type = Annotated[
            Path, typer.Argument(help="Events file: CSV, CSV.gz or Parquet.", show_default=False)
        ]
        shared[0] = shared[0].replace(annotation=file_type)

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        source = DataSource(**{name: kwargs.pop(name) for name in _SOURCE_FIELDS})
        return command(source=source, **kwargs)

    ordered = sorted(shared + own, key=lambda p: p.default is not inspect.Parameter.empty)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]  # read by typer
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]
    )
    return wrapper  # type: ignore[return-value]


def file_and_preset(spec: str, option: str) -> tuple[Path, str]:
    """`FILE:PRESET` (an existing file and a named preset), as `--data` of simulate and `--also` of
    pretrain take it."""
    path, sep, preset = spec.rpartition(":")
    if not sep or preset not in PRESETS:
        raise FedanomError(f"{option} {spec}: write FILE:PRESET with a preset from {', '.join(PRESETS)}")
    if not Path(path).is_file():
        raise FedanomError(f"{option} {spec}: {path} does not exist")
    return Path(path), preset


def session_config(gap_minutes: float, window: int) -> SessionConfig:
    try:
        return SessionConfig(gap_minutes=gap_minutes, window=window)
    except ValueError as exc:
        raise FedanomError(f"--session-gap/--window: {exc}") from None


class progress_bar:
    """A rich progress bar on stderr, shown only on a terminal."""

    def __init__(
        self, description: str, *, enabled: bool = True, total: float | None = None, unit_bytes: bool = True
    ):
        columns = [BarColumn(), DownloadColumn()] if unit_bytes else [BarColumn()]
        self.bar = Progress(
            "[progress.description]{task.description}",
            *columns,
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not (enabled and err.is_terminal),
        )
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> progress_bar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update_bytes(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def advance(self, amount: float = 1.0) -> None:
        self.bar.advance(self.task, amount)
