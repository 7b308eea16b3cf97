"""The `fedanom` command: one entry point for merchants, operators and researchers.

User mistakes raise `FedanomError` anywhere below; `run` turns them into one red sentence on stderr and
exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from fedanom.client.commands import client, score, train
from fedanom.client.serve_command import serve
from fedanom.common.check import DataSummary, summarize
from fedanom.common.errors import FedanomError
from fedanom.common.prepared import cache_state
from fedanom.common.presets import PRESETS
from fedanom.common.sessions import SessionConfig
from fedanom.common.tokens import VOCAB_VERSION
from fedanom.options import DataSource, SessionGapOption, WindowOption, data_options, err, session_config
from fedanom.server.commands import pretrain, server
from fedanom.simulations.commands import simulate

app = typer.Typer(
    name="fedanom",
    help="Federated anomaly detection for e-commerce behaviour.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect a merchant's event export.", no_args_is_help=True)
app.add_typer(data_app, name="data")
privacy_app = typer.Typer(help="What a federation spent of its merchants' privacy.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
app.command("pretrain")(pretrain)
app.command("train")(train)
app.command("score")(score)
app.command("client")(client)
app.command("serve")(serve)
app.command("server")(server)
app.command("simulate")(simulate)


@data_app.command("check")
@data_options(file_argument=True)
def data_check(
    source: DataSource,
    session_gap: SessionGapOption = SessionConfig.gap_minutes,
    window: WindowOption = SessionConfig.window,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="A merchant's state directory: does it hold this export prepared?"),
    ] = None,
) -> None:
    """Is my export readable, what is in it, and which rows are bad and why."""
    config = session_config(session_gap, window)
    ingested = source.read(
        default_quarantine=Path.cwd() / f"{source.data.name}.quarantine.csv",
        config=config,
        show_progress=not as_json,
    )
    summary = summarize(ingested, source.preset_name, VOCAB_VERSION)
    if state_dir is not None:
        summary.prepared = cache_state(source.data, source.resolved_preset(), state_dir, config)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)


@data_app.command("presets")
def data_presets() -> None:
    """The export formats fedanom reads out of the box."""
    table = Table(title="presets (--preset)")
    table.add_column("preset")
    table.add_column("export")
    for name, preset in PRESETS.items():
        table.add_row(name, preset.description)
    table.add_row("(none)", "generic: columns named after the fields, or --map FIELD=COLUMN,...")
    Console().print(table)


@privacy_app.command("report")
def privacy_report(
    run_dir: Annotated[
        Path, typer.Argument(help="The federation's run directory (fedanom server --run-dir).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="The chart, a PNG (default: RUN_DIR/privacy.png).")
    ] = None,
) -> None:
    """Each merchant's ε spent, round by round, as the server logged its accountant: a table and a chart."""
    from fedanom.server.privacy_report import chart, epsilon_by_round, table

    rounds, spent, policy = epsilon_by_round(run_dir)
    Console(soft_wrap=True).print(table(rounds, spent, policy))
    target = out or run_dir / "privacy.png"
    chart(rounds, spent, policy, target)
    typer.echo(f"chart: {target}")


def _print_summary(s: DataSummary) -> None:
    out = Console()
    overview = Table(title=f"{s.file} ({s.preset})", show_header=False)
    overview.add_row("rows in", f"{s.rows_in:,}")
    overview.add_row("rows kept", f"{s.rows_kept:,}")
    overview.add_row("rows quarantined", f"{s.rows_quarantined:,}")
    overview.add_row("in = kept + quarantined", "yes" if s.rows_conserved else "[red]NO[/red]")
    overview.add_row("events repeating another exactly", f"{s.duplicate_events:,}")
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
    if s.prepared is not None:
        out.print(f"prepared data: {s.prepared}")
    for note in s.notes:
        out.print(f"[yellow]note:[/yellow] {note}")


# Third-party notices that say nothing actionable to a merchant (each checked by hand).
QUIET = (
    "Secure RNG turned off",  # Opacus: documented in the README's privacy section
    "Full backward hook is firing",  # Opacus hooks on a frozen backbone
    "`is_gradient_checkpointing` is deprecated",  # peft calling transformers
    "Optimal order is the (largest|smallest) alpha",  # Opacus RDP at the edges of its order range
    "Tip: In future versions of Ray",  # Ray's accelerator variables: no GPU is asked of its workers
)


def run() -> None:
    """Console entry point."""
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    # read by transformers / huggingface_hub when first imported: the model stack loads after this
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)  # usage mistakes reach the handler below, not a rich box
    except click.UsageError as exc:
        if exc.format_message():  # empty when a bare command printed its help instead
            where = exc.ctx.command_path if exc.ctx is not None else "fedanom"
            err.print(
                f"[bold red]error:[/bold red] {_one_sentence(exc)} (see {where} --help)",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(2)
    except click.Abort:
        err.print("interrupted")
        sys.exit(130)
    except FedanomError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _one_sentence(exc: click.UsageError) -> str:
    """click's message, its "Did you mean" hint folded into the one sentence."""
    if isinstance(exc, click.NoSuchOption):
        hint = f" (did you mean {', '.join(sorted(exc.possibilities))}?)" if exc.possibilities else ""
        return f"no such option {exc.option_name}{hint}"
    return exc.format_message()
