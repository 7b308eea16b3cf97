"""The operator's Flower ServerApp: rounds of merchants' DP-trained adapters, checked and averaged.

Flower's FedAvg does the sampling and the messaging. Every reply is read as untrusted input
(server.replies), then goes through fedanom's checked aggregation (server.aggregation), so a malformed,
implausible or outsized reply is logged and left out instead of averaged. Merchants that lack the
backbone get it first (server.shipping). Each round ends with a federated evaluation on every
merchant's validation sessions. A round is complete once
`<run-dir>/round-<k>/` holds its metrics and then its global adapter; its JSON line (training and
evaluation, per merchant and combined) is then appended to `<run-dir>/rounds.jsonl`. With `resume` a
restarted run continues after its last completed round. The final global adapter is written with peft's
`save_pretrained` to `<run-dir>/global/adapter`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedanom.common.backbone import backbone_hash
from fedanom.common.detector.artifact import load_backbone
from fedanom.common.detector.model import attach_lora, trainable_state
from fedanom.common.errors import FedanomError
from fedanom.common.records import (
    EVALUATE_METRICS,
    RUN_DEFAULTS,
    SCORE_HEAD,
    flag,
    lora_settings,
    number,
    text,
    to_numpy,
    to_record,
)
from fedanom.server.aggregation import Arrays, aggregate, capped_weights, default_norm_bound
from fedanom.server.replies import BadReply, evaluate_reply, failure, train_reply
from fedanom.server.shipping import BackboneShipper

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
    "lora-targets",
    "supervised-head",
    "dp",
    "base",
    "epsilon",
    "sim-data",
    "sim-preset",
    "sim-state-root",
    "sim-labels",
)


class CheckedFedAvg(FedAvg):
    """FedAvg's sampling and messages; fedanom's validated aggregation and per-round log."""

    def __init__(
        self,
        *,
        method: str,
        norm_bound: float,
        shipper: BackboneShipper,
        round_offset: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.round_offset = round_offset  # rounds completed before a resume
        self.method = method
        self.norm_bound = norm_bound
        self.shipper = shipper
        self.current: Arrays = {}
        self.record: dict[str, Any] = {}  # the round in progress, logged once it is complete
        self.clock: dict[str, float] = {}  # when this round's messages went out (time.monotonic)
        # whether merchants whose labels cannot check it sum the anomaly head into their score: yes until
        # the labelled merchants' validation shows it ranks their attacks worse (aggregate_evaluate)
        self.score_head = True
        self.sent: list[Message] = []  # this round's instructions: the grid gives each its id on sending

    def sender(self, reply: Message) -> int:
        """The merchant a reply answers for. The SuperLink writes the error reply for a merchant that
        went away itself, from its own node id: the instruction it answers names the merchant."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        return addressed.get(reply.metadata.reply_to_message_id, SUPERLINK_NODE_ID)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        started = time.monotonic()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        unshipped = self.shipper.ensure(grid, [m.metadata.dst_node_id for m in messages])
        self.record = {"round": self.round_offset + server_round, "backbone_failed": _reasons(unshipped)}
        self.clock = {"backbone_check": time.monotonic() - started, "train_sent": time.monotonic()}
        self.sent = [m for m in messages if m.metadata.dst_node_id not in unshipped]
        return self.sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**config, SCORE_HEAD: self.score_head})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.record["score_head"] = self.score_head
        unshipped = self.shipper.ensure(grid, [m.metadata.dst_node_id for m in messages])
        self.clock["evaluate_sent"] = time.monotonic()
        self.sent = [m for m in messages if m.metadata.dst_node_id not in unshipped]
        return self.sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrived = time.monotonic()
        updates, failed, per_client, unreadable = [], [], {}, []
        for msg in replies:
            node = self.sender(msg)
            if msg.has_error():
                failed.append({"node": node, "reason": failure(msg)})
                continue
            try:
                update, per_client[str(node)] = train_reply(msg)
            except BadReply as exc:
                unreadable.append((node, str(exc)))
                continue
            updates.append(update)
        outcome = aggregate(updates, self.current, method=self.method, norm_bound=self.norm_bound)
        rejected = unreadable + outcome.rejected
        accepted = [u for u in updates if u.node in outcome.weights]
        combined: dict[str, float] = {}
        if accepted:
            weights = outcome.weights
            combined = {
                "train-loss": sum(per_client[str(u.node)]["train-loss"] * weights[u.node] for u in accepted)
                / sum(weights.values()),
                "max-epsilon": max(per_client[str(u.node)]["epsilon"] for u in accepted),
                "num-examples": sum(u.examples for u in accepted),
            }
        self.record.update(
            {
                "accepted": [u.node for u in accepted],
                "rejected": [{"node": node, "reason": reason} for node, reason in rejected],
                "clipped": [
                    {"node": node, "norm": norm, "bound": self.norm_bound}
                    for node, norm in outcome.clipped.items()
                ],
                "weights": {str(node): weight for node, weight in outcome.weights.items()},
                "failed": failed,
                "clients": per_client,
                "train": combined,
                "seconds": {
                    "backbone_check": self.clock["backbone_check"],
                    "train_round_trip": arrived - self.clock["train_sent"],
                    "aggregation": time.monotonic() - arrived,
                },
            }
        )
        if outcome.merged is None:
            return None, None
        return to_record(outcome.merged), MetricRecord(combined)  # type: ignore[arg-type]  # floats

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Every merchant's validation metrics, and their example-weighted means."""
        self.record["seconds"]["evaluate_round_trip"] = time.monotonic() - self.clock["evaluate_sent"]
        per_client: dict[str, dict[str, float]] = {}
        failed, rejected = [], []
        for msg in replies:
            node = self.sender(msg)
            if msg.has_error():
                failed.append({"node": node, "reason": failure(msg)})
                continue
            try:
                per_client[str(node)] = evaluate_reply(msg)
            except BadReply as exc:
                rejected.append({"node": node, "reason": str(exc)})
        combined: dict[str, float] = {}
        for key in EVALUATE_METRICS[1:]:  # weighted as training is: no claimed count decides alone
            reported = [m for m in per_client.values() if key in m]
            if reported:
                weights = capped_weights([int(m["num-examples"]) for m in reported])
                combined[key] = float(np.dot([m[key] for m in reported], weights) / weights.sum())
        self.record["evaluate"] = {
            "clients": per_client,
            "failed": failed,
            "rejected": rejected,
            "combined": combined,
        }
        # A DP-trained head learns from a few dozen attacks per merchant: on real exports it often adds
        # more noise than signal (BENCHMARKS.md, session 9). Merchants with too few labels of their own to
        # check it follow what the labelled ones measured this round.
        if "val-auprc-with-head" in combined and "val-auprc-without-head" in combined:
            self.score_head = combined["val-auprc-with-head"] >= combined["val-auprc-without-head"]
        return MetricRecord(combined) if combined else None  # type: ignore[arg-type]  # floats


def _reasons(failures: Mapping[int, str]) -> list[dict[str, Any]]:
    return [{"node": node, "reason": reason} for node, reason in failures.items()]


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


def wait_for_nodes(grid: Grid, expected: int, seconds: float) -> None:
    """Hold round 1 until the merchants the operator expects are connected (or time runs out), so a
    round is not started with the first few; later rounds need only min-nodes."""
    deadline = time.monotonic() + seconds
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1.0)


def rewrite_round_log(run_dir: Path, completed: int) -> None:
    """rounds.jsonl as one line per completed round, from the checkpoints (a killed run may have left
    a round half-written); a fresh run starts an empty log."""
    lines = [
        json.dumps(json.loads((run_dir / f"round-{k}" / "metrics.json").read_text()))
        for k in range(1, completed + 1)
        if (run_dir / f"round-{k}" / "metrics.json").exists()
    ]
    (run_dir / "rounds.jsonl").write_text("".join(line + "\n" for line in lines))


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
    resumed = last_checkpoint(run_dir) if flag(cfg, "resume") else None
    if resumed is not None:
        done, arrays = resumed
    rewrite_round_log(run_dir, done)
    norm_bound = number(cfg, "norm-bound") or default_norm_bound(arrays, number(cfg, "learning-rate"))
    if not 0 < norm_bound < math.inf:
        raise FedanomError(f"the update norm bound must be a positive number, not {norm_bound:g}")
    min_nodes = int(number(cfg, "min-nodes"))
    config = ConfigRecord({key: cfg[key] for key in FORWARDED})  # type: ignore[misc]  # numbers and text
    config["num-server-rounds"] = total_rounds
    config["round-offset"] = done
    shipper = BackboneShipper(base, config, timeout=number(cfg, "round-timeout"))
    config["backbone-hash"] = shipper.hash
    strategy = CheckedFedAvg(
        method=text(cfg, "aggregation"),
        norm_bound=norm_bound,
        shipper=shipper,
        round_offset=done,
        fraction_train=number(cfg, "fraction-train"),
        fraction_evaluate=number(cfg, "fraction-train"),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )

    def checkpoint(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        """The round is complete: its metrics, then its adapter (the mark of completion), then its line."""
        if server_round == 0:
            return None
        target = run_dir / f"round-{done + server_round}"
        target.mkdir(parents=True, exist_ok=True)
        summary = {**strategy.record, "time": time.time()}
        (target / "metrics.json").write_text(json.dumps(summary, indent=1))
        np.savez(target / "adapter.npz", **to_numpy(record))  # type: ignore[arg-type]  # names are keywords
        with open(run_dir / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(summary) + "\n")
        return None

    if total_rounds > done:
        if done == 0:
            wait_for_nodes(grid, int(number(cfg, "expect-nodes")), number(cfg, "round-timeout"))
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
