"""`fedanom pretrain`: the operator trains the frozen backbone every merchant adapts.

Self-supervised next-event prediction over the behaviour tokens of normal traffic the operator may use
(public or its own), with every weight trained and no DP (no merchant's data is involved). The result is
a plain `save_pretrained` directory with a content hash that detectors record and verify.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from transformers import PreTrainedModel

from fedanom.client.training import TrainSettings, train_model
from fedanom.common.artifact import load_backbone, save_backbone
from fedanom.common.model import ARCHITECTURES, BackboneConfig, pick_device
from fedanom.common.scoring import event_surprise
from fedanom.common.sessions import SessionConfig
from fedanom.common.windows import Windows
from fedanom.options import DataSource, DeviceOption, data_options, err


def pretrain_backbone(
    windows: Windows,
    config: BackboneConfig,
    settings: TrainSettings,
    *,
    start_from: Path | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, dict[str, float]]:
    """Train a backbone on the earlier 90% of sessions, from scratch (a config) or from any compatible
    model directory; report the held-out NLL per event."""
    fit_part, held_out = windows.chronological_split(0.9, 0.1)
    placed = pick_device(device)
    if start_from is not None:
        model = load_backbone(start_from, placed)
    else:
        model = config.build(seed=settings.seed, device=placed)
    report = train_model(model, fit_part, settings, device=placed)
    surprise = event_surprise(model, held_out, device=placed) if held_out.n_windows else None
    metrics = {
        "train_loss": report.mean_loss,
        "held_out_nll_per_event": float(np.mean(surprise.event)) if surprise is not None else float("nan"),
        "steps": report.steps,
        "sessions": report.sessions,
        "seconds": report.seconds,
    }
    return model, metrics


DEFAULT = BackboneConfig()


@data_options()
def pretrain(
    source: DataSource,
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone directory to write.")],
    architecture: Annotated[
        str, typer.Option("--architecture", help=f"One of {', '.join(ARCHITECTURES)}.")
    ] = DEFAULT.architecture,
    d_model: Annotated[int, typer.Option("--d-model")] = DEFAULT.d_model,
    layers: Annotated[int, typer.Option("--layers")] = DEFAULT.n_layers,
    heads: Annotated[int, typer.Option("--heads")] = DEFAULT.n_heads,
    window: Annotated[int, typer.Option("--window", help="Most events in one window.")] = DEFAULT.max_events,
    epochs: Annotated[float, typer.Option("--epochs")] = 2.0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model", help="Start from this causal-LM directory (any over the behaviour vocabulary)."
        ),
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Pretrain the behaviour backbone on normal traffic; write it with save_pretrained and a hash."""
    config = BackboneConfig(
        architecture=architecture, d_model=d_model, n_layers=layers, n_heads=heads, max_events=window
    )
    ingested = source.read(
        default_quarantine=out.with_name(out.name + ".quarantine.csv"), config=SessionConfig(window=window)
    )
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    err.print(f"pretraining a {architecture} backbone on {windows.n_windows:,} sessions from {source.data}")
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, dp=False, seed=seed
    )
    model, metrics = pretrain_backbone(windows, config, settings, start_from=base_model, device=device)
    digest = save_backbone(model, out, {"data": source.data.name, "config": asdict(config), **metrics})
    typer.echo(
        f"backbone written to {out} (hash {digest[:12]}): held-out surprise "
        f"{metrics['held_out_nll_per_event']:.3f} nats/event after {metrics['steps']} steps"
    )
