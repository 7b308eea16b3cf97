"""The operator's Flower ServerApp: rounds of merchants' DP-trained adapters, checked and averaged.

Flower's FedAvg does the sampling and the messaging; every reply then goes through fedanom's checked
aggregation (server.aggregation), so a malformed or outsized update is logged and left out instead of
averaged. After each round the global adapter and the round's metrics are checkpointed under
`<run-dir>/round-<k>/`, one JSON line per round is appended to `<run-dir>/rounds.jsonl`, and with
`resume` a restarted run continues after its last completed round. The final global adapter is written
with peft's `save_pretrained` to `<run-dir>/global/adapter`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedanom.common.artifact import backbone_hash, load_backbone
from fedanom.common.model import attach_lora, trainable_state
from fedanom.common.records import (
    RUN_DEFAULTS,
    TRAIN_METRICS,
    lora_settings,
    number,
    text,
    to_numpy,
    to_record,
)
from fedanom.server.aggregation import Arrays, Update, aggregate

app = ServerApp()

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
    "base",
    "epsilon",
    "sim-data",
    "sim-preset",
    "sim-state-root",
)


class CheckedFedAvg(FedAvg):
    """FedAvg's sampling and messages; fedanom's validated aggregation and per-round log."""

    def __init__(
        self, *, method: str, norm_bound: float | None, log_path: Path, round_offset: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.round_offset = round_offset  # rounds completed before a resume
        self.method = method
        self.norm_bound = norm_bound
        self.log_path = log_path
        self.current: Arrays = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, failed, per_client = [], [], {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append({"node": node, "reason": _last_sentence(msg.error.reason)})
                continue
            metrics = {key: number(msg.content.metric_records["metrics"], key) for key in TRAIN_METRICS}
            per_client[str(node)] = metrics
            arrays = to_numpy(msg.content.array_records["arrays"])
            updates.append(Update(node=node, arrays=arrays, examples=int(metrics["num-examples"])))
        merged, rejected = aggregate(updates, self.current, method=self.method, norm_bound=self.norm_bound)
        accepted = [u for u in updates if u.node not in {node for node, _ in rejected}]
        summary = {
            "round": self.round_offset + server_round,
            "time": time.time(),
            "accepted": [u.node for u in accepted],
            "rejected": [{"node": node, "reason": reason} for node, reason in rejected],
            "failed": failed,
            "clients": per_client,
        }
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
        if merged is None:
            return None, None
        examples = sum(u.examples for u in accepted)
        loss = sum(per_client[str(u.node)]["train-loss"] * u.examples for u in accepted) / examples
        epsilon = max(per_client[str(u.node)]["epsilon"] for u in accepted)
        return to_record(merged), MetricRecord(
            {"train-loss": loss, "max-epsilon": epsilon, "num-examples": examples}
        )


def _last_sentence(reason: str | None) -> str:
    """A ClientApp failure's own message, without the Ray and Flower traceback around it."""
    text = (reason or "").strip().rstrip("'>")
    return text.rsplit("Message: ", 1)[-1].splitlines()[-1] if text else "unknown error"


def last_checkpoint(run_dir: Path) -> tuple[int, Arrays] | None:
    """The last completed round and its global adapter, if this run has checkpoints."""
    rounds = sorted(
        (int(p.name.split("-")[1]), p) for p in run_dir.glob("round-*") if (p / "adapter.npz").exists()
    )
    if not rounds:
        return None
    k, path = rounds[-1]
    with np.load(path / "adapter.npz") as data:
        return k, {name: data[name] for name in data.files}


def build_app(overrides: Mapping[str, bool | float | int | str] | None = None) -> ServerApp:
    """A ServerApp whose run config is the defaults, then the Context's run config, then `overrides`."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**RUN_DEFAULTS, **context.run_config, **(overrides or {})})

    return server_app


def run_federation(grid: Grid, cfg: Mapping[str, object]) -> None:
    """The whole federated run: rounds, checkpoints, the final global adapter."""
    run_dir = Path(text(cfg, "run-dir"))
    run_dir.mkdir(parents=True, exist_ok=True)
    base = Path(text(cfg, "base"))
    lora = lora_settings(cfg)
    model = attach_lora(load_backbone(base), lora)
    arrays = {name: t.numpy() for name, t in trainable_state(model).items()}
    total_rounds, done = int(number(cfg, "num-server-rounds")), 0
    resumed = last_checkpoint(run_dir) if cfg.get("resume") is True else None
    if resumed is not None:
        done, arrays = resumed
    norm_bound = number(cfg, "norm-bound") or None
    min_nodes = int(number(cfg, "min-nodes"))
    strategy = CheckedFedAvg(
        method=text(cfg, "aggregation"),
        norm_bound=norm_bound,
        log_path=run_dir / "rounds.jsonl",
        round_offset=done,
        fraction_train=number(cfg, "fraction-train"),
        fraction_evaluate=number(cfg, "fraction-train"),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    config = ConfigRecord({key: cfg[key] for key in FORWARDED})  # type: ignore[misc]  # numbers and text
    config["num-server-rounds"] = total_rounds
    config["round-offset"] = done

    def checkpoint(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        target = run_dir / f"round-{done + server_round}"
        target.mkdir(parents=True, exist_ok=True)
        np.savez(target / "adapter.npz", **to_numpy(record))  # type: ignore[arg-type]  # names are keywords
        return None

    if total_rounds > done:
        result = strategy.start(
            grid,
            to_record(arrays),
            num_rounds=total_rounds - done,
            timeout=number(cfg, "round-timeout"),
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
        "backbone_hash": backbone_hash(base),
        "backbone": str(base),
        "rounds": total_rounds,
        "lora": lora.to_dict(),
    }
    (run_dir / "global" / "federation.json").write_text(json.dumps(meta, indent=2))


app = build_app()
