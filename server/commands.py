"""What the operator runs: `fedanom server` (below) and `fedanom pretrain` (at the end).

`fedanom server` checks the operator's options and runs the federation on a real Flower SuperLink
(`server.superlink`); merchants join with `fedanom client`. The model stack is imported inside the
commands (`pretrain`: once its data has been read), so `--help` and a mistake in the options answer
without waiting ~8 s for it to load.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from fedanom.common.backbone import backbone_hash
from fedanom.common.errors import FedanomError
from fedanom.common.flower import (
    check_transport,
    split_address,
)
from fedanom.common.ingest import ingest
from fedanom.common.policy import PrivacyPolicy
from fedanom.common.presets import resolve_preset
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import (
    ARCHITECTURE_NAMES,
    RUN_DEFAULTS,
    BackboneConfig,
    LoraSettings,
    TrainSettings,
)
from fedanom.common.windows import Windows
from fedanom.options import DataSource, DeviceOption, data_options, err, file_and_preset
from fedanom.server.aggregation import AGGREGATORS
from fedanom.server.checkpoints import RoundProgress
from fedanom.server.superlink import Listener, RunConfig, run_on_superlink


def server(
    base: Annotated[
        Path, typer.Option("--base", help="Backbone directory (sent, hash-checked, to merchants lacking it).")
    ],
    rounds: Annotated[int, typer.Option("--rounds")] = int(RUN_DEFAULTS["num-server-rounds"]),
    min_clients: Annotated[
        int, typer.Option("--min-clients", help="Merchants needed to start a round.")
    ] = int(RUN_DEFAULTS["min-nodes"]),
    expect_clients: Annotated[
        int, typer.Option("--expect-clients", help="Merchants to wait for before round 1 (0: --min-clients).")
    ] = int(RUN_DEFAULTS["expect-nodes"]),
    fraction: Annotated[
        float, typer.Option("--fraction", help="Share of merchants sampled each round.")
    ] = float(RUN_DEFAULTS["fraction-train"]),
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds to wait for replies.")
    ] = float(RUN_DEFAULTS["round-timeout"]),
    aggregation: Annotated[str, typer.Option("--aggregation", help=", ".join(AGGREGATORS))] = str(
        RUN_DEFAULTS["aggregation"]
    ),
    norm_bound: Annotated[
        float,
        typer.Option(
            "--norm-bound",
            help="Each update's change is clipped to this norm; 0: 10 x learning rate per value.",
        ),
    ] = float(RUN_DEFAULTS["norm-bound"]),
    local_epochs: Annotated[float, typer.Option("--local-epochs")] = float(RUN_DEFAULTS["local-epochs"]),
    batch_size: Annotated[int, typer.Option("--batch-size")] = TrainSettings.batch_size,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = TrainSettings.learning_rate,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm")] = TrainSettings.max_grad_norm,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = LoraSettings.rank,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha.")] = LoraSettings.alpha,
    lora_targets: Annotated[
        str,
        typer.Option(
            "--lora-targets",
            help="Comma-separated linear layers to adapt (default: Llama's q_proj,v_proj; GPT-2's all).",
        ),
    ] = "",
    supervised_head: Annotated[
        bool,
        typer.Option(
            "--supervised-head", help="An anomaly head in the adapter, trained by merchants with --labels."
        ),
    ] = False,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Checkpoints, logs, the global adapter.")] = Path(
        "runs/fedanom"
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
    ] = False,
    max_epsilon: Annotated[
        float, typer.Option("--max-epsilon", help="Largest total ε a merchant may join with (0: any).")
    ] = 0.0,
    max_delta: Annotated[
        float, typer.Option("--max-delta", help="Largest δ a merchant may use (0: any).")
    ] = 0.0,
) -> None:
    """Run a federation: a Flower SuperLink, rounds of merchants' DP adapters, a global detector."""
    backbone_hash(base)  # a clear error now rather than in every merchant later
    if aggregation not in AGGREGATORS:
        raise FedanomError(f"--aggregation must be one of {', '.join(AGGREGATORS)}")
    if not 0 <= norm_bound < math.inf:
        raise FedanomError(f"--norm-bound {norm_bound:g}: give a positive norm, or 0 for the default")
    host, port = split_address(address)
    plain = check_transport(host, insecure=insecure, has_certificates=certificates is not None)
    for key in node_keys or []:
        if not key.is_file():
            raise FedanomError(f"--node-key {key} does not exist")
    if node_keys and plain:
        raise FedanomError(
            "--node-key needs TLS: give --certificates (Flower authenticates nodes over TLS only)"
        )
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    values: RunConfig = {
        "num-server-rounds": rounds,
        "min-nodes": min_clients,
        "expect-nodes": expect_clients,
        "fraction-train": fraction,
        "round-timeout": round_timeout,
        "aggregation": aggregation,
        "norm-bound": norm_bound,
        "resume": resume,
        "run-dir": str(run_dir),
        "base": str(base.resolve()),
        "local-epochs": local_epochs,
        "batch-size": batch_size,
        "learning-rate": learning_rate,
        "max-grad-norm": max_grad_norm,
        "lora-rank": rank,
        "lora-alpha": alpha,
        "lora-targets": lora_targets,
        "supervised-head": supervised_head,
        "require-dp": require_dp,
        "max-epsilon": max_epsilon,
        "max-delta": max_delta,
    }
    PrivacyPolicy.from_config(values)  # a policy that is not one, said now rather than in round 1
    listener = Listener(host, port, None if plain else (certificates or Path()).resolve())
    progress = RoundProgress(run_dir, rounds, typer.echo, resumed=resume)
    finished = run_on_superlink(listener, run_dir, values, node_keys or [], progress)
    rounds_log = run_dir / "rounds.jsonl"
    if finished != 0 or not (run_dir / "global" / "adapter").exists():
        raise FedanomError(f"the federated run did not finish; see {run_dir / 'superlink.log'}")
    done = [json.loads(line) for line in rounds_log.read_text().splitlines()] if rounds_log.exists() else []
    rejected = sum(len(r["rejected"]) for r in done)
    typer.echo(
        f"federation finished: {len(done)} rounds, {rejected} updates rejected; "
        f"global adapter in {run_dir / 'global' / 'adapter'}, checkpoints in {run_dir}"
    )


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
    from fedanom.common.detector.artifact import save_backbone  # the model stack, once the data is good
    from fedanom.server.pretrain import pretrain_backbone

    err.print(
        f"pretraining a {architecture} backbone on {sum(p.n_windows for p in parts):,} sessions from "
        f"{', '.join(names)}"
    )
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, dp=False, seed=seed
    )
    model, metrics = pretrain_backbone(parts, config, settings, start_from=base_model, device=device)
    digest = save_backbone(model, out, {"data": names, "config": asdict(config), **metrics})
    typer.echo(
        f"backbone written to {out} (hash {digest[:12]}): held-out surprise "
        f"{metrics['held_out_nll_per_event']:.3f} nats/event after {metrics['steps']} steps"
    )
