"""Pretraining: the operator trains the frozen backbone every merchant adapts (`fedanom pretrain`).

Self-supervised next-event prediction over the behaviour tokens of normal traffic the operator may use
(public or its own), with every weight trained and no DP (no merchant's data is involved). The result is
a plain `save_pretrained` directory with a content hash that detectors record and verify.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from fedanom.common.detector.artifact import load_backbone, save_backbone
from fedanom.common.detector.model import build_backbone, pick_device
from fedanom.common.detector.scoring import event_surprise
from fedanom.common.detector.training import train_model
from fedanom.common.settings import BackboneConfig, TrainSettings
from fedanom.common.windows import Windows


def pretrain_backbone(
    windows: Windows | list[Windows],
    config: BackboneConfig,
    settings: TrainSettings,
    *,
    start_from: Path | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, dict[str, float]]:
    """Train a backbone on the earlier 90% of sessions, from scratch (a config) or from any compatible
    model directory; report the held-out NLL per event. Several sources (exports of different shops and
    years) are each split in time on their own, so every one is trained on and held out from."""
    # public data and no DP: a backbone is reproducible, from seed 0 unless the operator picks another
    seed = settings.seed or 0
    settings = replace(settings, seed=seed)
    splits = [
        part.chronological_split(0.9, 0.1) for part in (windows if isinstance(windows, list) else [windows])
    ]
    fit_part = Windows.concat([fit for fit, _ in splits])
    held_out = Windows.concat([held for _, held in splits])
    placed = pick_device(device)
    if start_from is not None:
        model = load_backbone(start_from, placed)
    else:
        model = build_backbone(config, seed=seed, device=placed)
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


def pretrain_and_save(
    parts: list[Windows],
    names: list[str],
    config: BackboneConfig,
    settings: TrainSettings,
    out: Path,
    *,
    start_from: Path | None,
    device: str | None,
) -> str:
    """`fedanom pretrain` once its exports are read: the backbone trained and written with its hash, and
    a line saying what it learned."""
    model, metrics = pretrain_backbone(parts, config, settings, start_from=start_from, device=device)
    digest = save_backbone(model, out, {"data": names, "config": asdict(config), **metrics})
    return (
        f"backbone written to {out} (hash {digest[:12]}): held-out surprise "
        f"{metrics['held_out_nll_per_event']:.3f} nats/event after {metrics['steps']} steps"
    )
