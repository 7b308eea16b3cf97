"""`fedanom serve`: its options checked before the web and model stacks load (`client.serve` runs it).

A key is required off loopback, and read from a file so that it never shows in the process list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedanom.common.errors import FedanomError
from fedanom.common.flower import is_loopback
from fedanom.common.presets import resolve_preset
from fedanom.options import (
    DeviceOption,
    EventTypeOption,
    MapOption,
    PresetOption,
    ScoringAlertRateOption,
    TimestampFormatOption,
)


def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Detector directory.")],
    preset: PresetOption = None,
    mapping: MapOption = None,
    timestamp_format: TimestampFormatOption = None,
    event_type: EventTypeOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", help="File holding the API key clients send (required off loopback)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", help="A merchant's state directory: serve each new global detector it gets."
        ),
    ] = None,
    alert_rate: ScoringAlertRateOption = None,
    max_memory_mb: Annotated[
        float, typer.Option("--max-memory-mb", help="Memory for open sessions; the least active go first.")
    ] = 256.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body accepted.")] = 1.0,
    track_alert_rate: Annotated[
        bool,
        typer.Option(
            "--track-alert-rate",
            help="Move the threshold so that the alert rate's share of recent sessions is flagged.",
        ),
    ] = False,
    alert_rate_bounds: Annotated[
        str | None,
        typer.Option(
            "--alert-rate-bounds",
            help="FEWEST,MOST: the tracked threshold stays between the calibrated ones at these alert "
            "rates (default: a quarter and four times the alert rate).",
        ),
    ] = None,
    popularity_refresh: Annotated[
        float,
        typer.Option(
            "--popularity-refresh", help="Seconds between re-bucketing item popularity with served events."
        ),
    ] = 60.0,
    device: DeviceOption = None,
) -> None:
    """Score live events over HTTP as they arrive: each event's session so far, flagged when it passes."""
    resolved = resolve_preset(
        preset, mapping=mapping, timestamp_format=timestamp_format, event_types=tuple(event_type or ())
    )
    api_key = None
    if api_key_file is not None:
        if not api_key_file.is_file():
            raise FedanomError(f"--api-key-file {api_key_file} does not exist")
        api_key = api_key_file.read_text().strip()
        if len(api_key) < 16:
            raise FedanomError(f"--api-key-file {api_key_file} must hold a key of at least 16 characters")
    elif not is_loopback(host):
        raise FedanomError(f"--host {host} is reachable from other machines: give an --api-key-file")
    if not (max_memory_mb > 0 and max_body_mb > 0 and popularity_refresh >= 0):  # NaN fails too
        raise FedanomError(
            "--max-memory-mb and --max-body-mb must be positive, --popularity-refresh not negative"
        )
    if alert_rate_bounds and not track_alert_rate:
        raise FedanomError("--alert-rate-bounds bounds the tracked threshold: add --track-alert-rate")
    bounds = _alert_rate_bounds(alert_rate_bounds) if alert_rate_bounds else None
    from fedanom.client.serve import run_service  # the model stack and the web stack, once options are good

    run_service(
        model,
        resolved,
        host=host,
        port=port,
        api_key=api_key,
        watch=state_dir / "detector" if state_dir is not None else None,
        alert_rate=alert_rate,
        max_bytes=int(max_memory_mb * 2**20),
        max_body_bytes=int(max_body_mb * 2**20),
        refresh_s=popularity_refresh,
        track=track_alert_rate,
        bounds=bounds,
        device=device,
    )


def _alert_rate_bounds(text: str) -> tuple[float, float]:
    try:
        fewest, most = (float(part) for part in text.split(","))
    except ValueError:
        raise FedanomError(f"--alert-rate-bounds {text}: write FEWEST,MOST, e.g. 0.0025,0.04") from None
    if not 0 < fewest < most < 1:
        raise FedanomError(f"--alert-rate-bounds {text}: need 0 < FEWEST < MOST < 1")
    return fewest, most
