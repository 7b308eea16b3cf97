"""What the operator runs: `fedanom server` (below) and `fedanom pretrain` (at the end).

`fedanom server` checks the operator's options and runs the federation on a real Flower SuperLink
(`server.superlink`); merchants join with `fedanom client`. The model stack is imported inside the
commands (`pretrain`: once its data has been read), so `--help` and a mistake in the options answer
without waiting ~8 s for it to load.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import AGGREGATIONS, ARCHITECTURE_NAMES, PRETRAIN, BackboneConfig, RunSettings
from fedanom.common.windows import Windows
from fedanom.options import (
    DataSource,
    DeviceOption,
    MaxWindowsPerUserOption,
    PrivacyUnitOption,
    VerboseOption,
    data_options,
    err,
    file_and_preset,
)
from fedanom.server.superlink import run_server


def server(
    base: Annotated[
        Path, typer.Option("--base", help="Backbone directory (sent, hash-checked, to merchants lacking it).")
    ],
    rounds: Annotated[int, typer.Option("--rounds")] = RunSettings.num_server_rounds,
    min_clients: Annotated[
        int, typer.Option("--min-clients", help="Merchants needed to start a round.")
    ] = RunSettings.min_nodes,
    expect_clients: Annotated[
        int, typer.Option("--expect-clients", help="Merchants to wait for before round 1 (0: --min-clients).")
    ] = RunSettings.expect_nodes,
    fraction: Annotated[
        float, typer.Option("--fraction", help="Share of merchants sampled each round.")
    ] = RunSettings.fraction_train,
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds to wait for replies.")
    ] = RunSettings.round_timeout,
    aggregation: Annotated[
        str, typer.Option("--aggregation", help=", ".join(AGGREGATIONS))
    ] = RunSettings.aggregation,
    norm_bound: Annotated[
        float,
        typer.Option(
            "--norm-bound",
            help="Each update's change is clipped to this norm; 0: 10 x learning rate per value.",
        ),
    ] = RunSettings.norm_bound,
    local_epochs: Annotated[float, typer.Option("--local-epochs")] = RunSettings.local_epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = RunSettings.batch_size,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = RunSettings.learning_rate,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm")] = RunSettings.max_grad_norm,
    privacy_unit: PrivacyUnitOption = RunSettings.privacy_unit,
    max_windows_per_user: MaxWindowsPerUserOption = RunSettings.max_windows_per_user,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = RunSettings.lora_rank,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha.")] = RunSettings.lora_alpha,
    lora_targets: Annotated[
        str,
        typer.Option(
            "--lora-targets",
            help="Comma-separated linear layers to adapt (default: Llama's q_proj,v_proj; GPT-2's all).",
        ),
    ] = RunSettings.lora_targets,
    supervised_head: Annotated[
        bool,
        typer.Option(
            "--supervised-head", help="An anomaly head in the adapter, trained by merchants with --labels."
        ),
    ] = RunSettings.supervised_head,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Checkpoints, logs, the global adapter.")] = Path(
        RunSettings.run_dir
    ),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the last completed round.")
    ] = False,
    address: Annotated[
        str, typer.Option("--address", help="Where merchants reach the SuperLink.")
    ] = "127.0.0.1:8000",
    certificates: Annotated[
        Path | None, typer.Option("--certificates", help="Directory with ca.crt, server.pem, server.key.")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain text outside loopback.")] = False,
    node_keys: Annotated[
        list[Path] | None,
        typer.Option(
            "--node-key", help="A merchant's SuperNode public key (repeat); only these nodes may join (TLS)."
        ),
    ] = None,
    require_dp: Annotated[
        bool, typer.Option("--require-dp", help="Merchants must train with DP: others are refused.")
    ] = RunSettings.require_dp,
    max_epsilon: Annotated[
        float, typer.Option("--max-epsilon", help="Largest total ε a merchant may join with (0: any).")
    ] = RunSettings.max_epsilon,
    max_delta: Annotated[
        float, typer.Option("--max-delta", help="Largest δ a merchant may use (0: any).")
    ] = RunSettings.max_delta,
    verbose: VerboseOption = False,
) -> None:
    """Run a federation: a Flower SuperLink, rounds of merchants' DP adapters, a global detector."""
    settings = RunSettings(
        num_server_rounds=rounds,
        min_nodes=min_clients,
        expect_nodes=expect_clients,
        fraction_train=fraction,
        round_timeout=round_timeout,
        aggregation=aggregation,
        norm_bound=norm_bound,
        resume=resume,
        run_dir=str(run_dir.resolve()),
        base=str(base.resolve()),
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        privacy_unit=privacy_unit,
        max_windows_per_user=max_windows_per_user,
        lora_rank=rank,
        lora_alpha=alpha,
        lora_targets=lora_targets,
        supervised_head=supervised_head,
        require_dp=require_dp,
        max_epsilon=max_epsilon,
        max_delta=max_delta,
    )
    keys = node_keys or []
    summary = run_server(
        settings,
        address=address,
        certificates=certificates,
        insecure=insecure,
        node_keys=keys,
        echo=typer.echo,
        verbose=verbose,
    )
    typer.echo(summary)


DEFAULT_BACKBONE = BackboneConfig()


@data_options()
def pretrain(
    source: DataSource,
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone directory to write.")],
    architecture: Annotated[
        str, typer.Option("--architecture", help=f"One of {', '.join(ARCHITECTURE_NAMES)}.")
    ] = DEFAULT_BACKBONE.architecture,
    d_model: Annotated[int, typer.Option("--d-model")] = DEFAULT_BACKBONE.d_model,
    layers: Annotated[int, typer.Option("--layers")] = DEFAULT_BACKBONE.n_layers,
    heads: Annotated[int, typer.Option("--heads")] = DEFAULT_BACKBONE.n_heads,
    window: Annotated[
        int, typer.Option("--window", help="Most events in one window.")
    ] = DEFAULT_BACKBONE.max_events,
    epochs: Annotated[float, typer.Option("--epochs")] = PRETRAIN.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = PRETRAIN.batch_size,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = PRETRAIN.learning_rate,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model", help="Start from this causal-LM directory (any over the behaviour vocabulary)."
        ),
    ] = None,
    also: Annotated[
        list[str] | None,
        typer.Option(
            "--also",
            help="One more public export as FILE:PRESET, read with that preset's own settings and item "
            "popularity (repeat).",
        ),
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Pretrain the behaviour backbone on normal traffic; write it with save_pretrained and a hash."""
    config = BackboneConfig(
        architecture=architecture, d_model=d_model, n_layers=layers, n_heads=heads, max_events=window
    )
    more = [file_and_preset(spec, "--also") for spec in also or []]
    sessions = SessionConfig(window=window)
    ingested = source.read(default_quarantine=out.with_name(out.name + ".quarantine.csv"), config=sessions)
    parts = [Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)]
    for k, (path, preset) in enumerate(more, start=1):
        extra = ingest(
            path,
            resolve_preset(preset),
            config=sessions,
            quarantine_path=out.with_name(f"{out.name}.{k}.quarantine.csv"),
        )
        parts.append(Windows.from_batches(extra.batches(), extra.popularity, extra.report).keyed(f"file-{k}"))
    names = [source.data.name, *(path.name for path, _ in more)]
    err.print(
        f"pretraining a {architecture} backbone on {sum(p.n_windows for p in parts):,} sessions from "
        f"{', '.join(names)}"
    )
    from fedanom.server.pretrain import pretrain_and_save  # the model stack, once the data is good

    settings = replace(PRETRAIN, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    typer.echo(pretrain_and_save(parts, names, config, settings, out, start_from=base_model, device=device))
