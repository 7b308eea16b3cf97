"""`fedanom train`, `fedanom score` and `fedanom client`: what a merchant runs on its own machine.

The model stack (torch, transformers, peft, Opacus) is imported inside the commands, once the data has
been read (`score` needs the detector first), so `--help` and a mistake in the options or the data file
answer without waiting ~8 s for it to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedanom.client.supernode import join_federation
from fedanom.common.errors import FedanomError
from fedanom.common.labels import read_labels
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import ALERT_RATE, EPSILON, LoraSettings, TrainSettings
from fedanom.common.windows import Windows
from fedanom.options import (
    DataSource,
    DeviceOption,
    EpsilonOption,
    MaxWindowsPerUserOption,
    PrivacyUnitOption,
    ScoringAlertRateOption,
    SessionGapOption,
    StateDirOption,
    VerboseOption,
    WindowOption,
    data_options,
    err,
    progress_bar,
    session_config,
)


@data_options()
def train(
    source: DataSource,
    base: Annotated[Path, typer.Option("--base", help="Backbone directory (from `fedanom pretrain`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Detector directory to write.")],
    epsilon: EpsilonOption = EPSILON,
    delta: Annotated[
        float | None,
        typer.Option(
            "--delta", help="δ (default 1 / training units, sessions or shoppers; fixed at first use)."
        ),
    ] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy.")] = False,
    privacy_unit: PrivacyUnitOption = TrainSettings.privacy_unit,
    max_windows_per_user: MaxWindowsPerUserOption = TrainSettings.max_windows_per_user,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="CSV of known sessions: session_id (or user_id), label (1=attack)."),
    ] = None,
    state_dir: StateDirOption = Path(".fedanom-state"),
    epochs: Annotated[float, typer.Option("--epochs")] = TrainSettings.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = TrainSettings.batch_size,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = TrainSettings.learning_rate,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Clipping bound per privacy unit.")
    ] = TrainSettings.max_grad_norm,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = LoraSettings.rank,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha.")] = LoraSettings.alpha,
    full_lora: Annotated[
        bool, typer.Option("--full-lora", help="Train LoRA A too (default: FFA-LoRA).")
    ] = False,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            "--lora-targets",
            help="Comma-separated linear layers to adapt (default: Llama's q_proj,v_proj; GPT-2's all).",
        ),
    ] = None,
    alert_rate: Annotated[
        float, typer.Option("--alert-rate", help="Share of normal sessions to flag.")
    ] = ALERT_RATE,
    session_gap: SessionGapOption = SessionConfig.gap_minutes,
    window: WindowOption = SessionConfig.window,
    device: DeviceOption = None,
) -> None:
    """Fit a detector on this merchant's own events, with DP: adapter + calibration, saved to --out."""
    session = session_config(session_gap, window)
    train = TrainSettings(  # a mistake in these is said before the export is read
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        dp=not no_dp,
        privacy_unit=privacy_unit,
        max_windows_per_user=max_windows_per_user,
    )
    ingested = source.read(default_quarantine=out.with_name(out.name + ".quarantine.csv"), config=session)
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    known = read_labels(labels, windows) if labels else None
    from fedanom.client.local import train_detector  # the model stack, once the inputs are good

    summary = train_detector(
        ingested,
        windows,
        known,
        name=source.data.name,
        base=base,
        out=out,
        lora=LoraSettings(
            rank=rank,
            alpha=alpha,
            targets=tuple(t.strip() for t in (lora_targets or "").split(",") if t.strip()),
            ffa=not full_lora,
        ),
        train=train,
        session=session,
        epsilon=epsilon,
        delta=delta,
        state_dir=state_dir,
        alert_rate=alert_rate,
        device=device,
        say=err.print,
    )
    typer.echo(summary)


@data_options()
def score(
    source: DataSource,
    model: Annotated[Path, typer.Option("--model", "-m", help="Detector directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores file: .csv or .parquet.")],
    explain_events: Annotated[
        bool,
        typer.Option(
            "--explain", help="Add the most surprising events and features of each session, in words."
        ),
    ] = False,
    alert_rate: ScoringAlertRateOption = None,
    device: DeviceOption = None,
) -> None:
    """Score every session of a file: id, user, score, rank, flag (and why, with --explain)."""
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise FedanomError(f"--out {out} must end in .csv or .parquet")
    from fedanom.common.detector.detector import BehaviourDetector  # the model stack, once --out is good
    from fedanom.common.detector.scores import score_ingested, write_scores

    detector = BehaviourDetector.load(model, device)
    threshold = detector.threshold(alert_rate)
    ingested = source.read(
        default_quarantine=out.with_name(out.name + ".quarantine.csv"),
        config=detector.session,
        popularity=detector.popularity,
    )
    with progress_bar("scoring", total=ingested.builder.n_partitions, unit_bytes=False) as bar:
        sessions = score_ingested(
            detector,
            ingested,
            alert_rate=alert_rate,
            with_explanations=explain_events,
            on_batch=bar.advance,
        )
    write_scores(sessions, out)
    typer.echo(
        f"scored {len(sessions):,} sessions ({ingested.report.rows_kept:,} events) into {out}: "
        f"{int(sessions.flag.sum()):,} flagged at threshold {threshold:.3f}"
    )


@data_options()
def client(
    source: DataSource,
    server: Annotated[str, typer.Option("--server", help="The operator's SuperLink, HOST:PORT.")],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base", help="Own copy of the backbone (default: the operator ships one, hash-checked)."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV of known attacks (session_id or user_id, label): local AUROC; trains the anomaly "
            "head when the federation's adapter has one (fedanom server --supervised-head).",
        ),
    ] = None,
    state_dir: StateDirOption = Path(".fedanom-state"),
    epsilon: EpsilonOption = EPSILON,
    port: Annotated[
        int, typer.Option("--port", help="Local port of the SuperNode's own runtime API.")
    ] = 9094,
    root_certificates: Annotated[
        Path | None, typer.Option("--root-certificates", help="CA certificate of the operator's SuperLink.")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain text outside loopback.")] = False,
    threads: Annotated[
        int, typer.Option("--threads", help="CPU threads for training and scoring (0: PyTorch's default).")
    ] = 0,
    give_up_after: Annotated[
        float, typer.Option("--give-up-after", help="Seconds to keep trying to join before giving up.")
    ] = 3600.0,
    auth_key: Annotated[
        Path | None,
        typer.Option(
            "--auth-key", help="This SuperNode's private key, when the operator authenticates nodes."
        ),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Join a federation as a merchant: a Flower SuperNode training on this data with DP (Ctrl-C leaves)."""
    if (
        source.mapping
        or source.sep
        or source.timestamp_format
        or source.event_type
        or source.encoding != "utf-8"
    ):
        raise FedanomError(
            "a federation client reads its data with --preset only; convert the file or use a preset"
        )
    prepared = source.prepare(state_dir)  # fails early, in one sentence; the first round finds it ready
    node_config: dict[str, str | float] = {
        "data": str(source.data.resolve()),
        "preset": source.preset or "",
        "state-dir": str(state_dir.resolve()),
        "epsilon": epsilon,
        "base": str(base.resolve()) if base else "",
        "labels": str(labels.resolve()) if labels else "",
    }
    join_federation(
        node_config,
        events=prepared.events,
        server=server,
        port=port,
        root_certificates=root_certificates,
        insecure=insecure,
        auth_key=auth_key,
        threads=threads,
        give_up_after=give_up_after,
        say=err.print,
        verbose=verbose,
    )
