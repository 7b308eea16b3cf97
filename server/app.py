"""The operator's Flower ServerApp: rounds of merchants' DP-trained adapters, checked and averaged.

The strategy (`server.strategy`) checks every reply before it is averaged and ships the backbone to
merchants that lack it; each round ends with a federated evaluation on every merchant's validation
sessions and a checkpoint (`server.checkpoints`), from which `resume` continues a restarted run. The
final global adapter is written with peft's `save_pretrained` to `<run-dir>/global/adapter`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedanom.common.detector.artifact import load_backbone
from fedanom.common.detector.model import attach_lora, lora_targets_of, trainable_state
from fedanom.common.errors import FedanomError
from fedanom.common.policy import PrivacyPolicy
from fedanom.common.records import lora_settings, to_numpy, to_record
from fedanom.common.settings import RunSettings
from fedanom.server.aggregation import default_norm_bound
from fedanom.server.checkpoints import last_checkpoint, rewrite_round_log, write_round
from fedanom.server.shipping import BackboneShipper
from fedanom.server.strategy import CheckedFedAvg

# Run-config keys forwarded to every merchant with each round's instructions: ClientApps read no run
# config of their own, so simulation and deployment behave alike.
FORWARDED = (
    "local-epochs",
    "batch-size",
    "learning-rate",
    "max-grad-norm",
    "lora-rank",
    "lora-alpha",
    "lora-seed",
    "lora-targets",
    "supervised-head",
    "dp",
    "privacy-unit",
    "max-windows-per-user",
    "base",
    "require-dp",
    "max-epsilon",
    "max-delta",
)


def wait_for_nodes(grid: Grid, expected: int, seconds: float) -> None:
    """Hold round 1 until the merchants the operator expects are connected (or time runs out), so a
    round is not started with the first few; later rounds need only min-nodes."""
    deadline = time.monotonic() + seconds
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1.0)


def build_app(overrides: Mapping[str, bool | float | int | str] | None = None) -> ServerApp:
    """A ServerApp whose run config is the defaults, then the Context's run config, then `overrides`."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, RunSettings.from_config({**context.run_config, **(overrides or {})}))

    return server_app


def run_federation(grid: Grid, run: RunSettings) -> None:
    """The whole federated run: rounds, checkpoints, the final global adapter."""
    cfg = run.to_config()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = Path(run.base)
    lora = lora_settings(cfg)
    model = attach_lora(load_backbone(base), lora)
    arrays = {name: t.numpy() for name, t in trainable_state(model).items()}
    total_rounds, done = run.num_server_rounds, 0
    resumed = last_checkpoint(run_dir) if run.resume else None
    if resumed is not None:
        done, arrays = resumed
    rewrite_round_log(run_dir, done)
    norm_bound = run.norm_bound or default_norm_bound(arrays, run.learning_rate)
    if not 0 < norm_bound < math.inf:
        raise FedanomError(f"the update norm bound must be a positive number, not {norm_bound:g}")
    policy = PrivacyPolicy.from_config(cfg)  # a policy that is not one stops the run before round 1
    min_nodes = run.min_nodes
    config = ConfigRecord({key: cfg[key] for key in FORWARDED})
    # the layers by name, as this server resolved them: a merchant whose version defaults to other layers
    # still trains the same adapter
    config["lora-targets"] = ",".join(lora_targets_of(model))
    config["num-server-rounds"] = total_rounds
    config["round-offset"] = done
    shipper = BackboneShipper(base, timeout=run.round_timeout)
    config["backbone-hash"] = shipper.hash
    strategy = CheckedFedAvg(
        method=run.aggregation,
        norm_bound=norm_bound,
        shipper=shipper,
        policy=policy,
        round_offset=done,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_train,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )

    def checkpoint(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            write_round(run_dir, done + server_round, strategy.record, to_numpy(record))
        return None

    if total_rounds > done:
        if done == 0:
            wait_for_nodes(grid, run.expect_nodes, run.round_timeout)
        result = strategy.start(
            grid,
            to_record(arrays),
            num_rounds=total_rounds - done,
            timeout=run.round_timeout,
            train_config=config,
            evaluate_config=config,
            evaluate_fn=checkpoint,
        )
        arrays = to_numpy(result.arrays)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in arrays:
                param.copy_(torch.from_numpy(arrays[name]))
    model.save_pretrained(str(run_dir / "global" / "adapter"))
    meta = {
        "backbone_hash": shipper.hash,  # hashed once, when the run started
        "backbone": str(base),
        "rounds": total_rounds,
        "lora": lora.to_dict(),
    }
    (run_dir / "global" / "federation.json").write_text(json.dumps(meta, indent=2))


app = build_app()
