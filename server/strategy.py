"""The federation's strategy: Flower's FedAvg does the sampling and the messaging; every reply is read as
untrusted input (`server.replies`) and goes through fedanom's checked aggregation (`server.aggregation`),
so a malformed, implausible or outsized reply is logged and left out instead of averaged. Merchants that
lack the backbone get it first (`server.shipping`).

Metrics are averaged by Flower's metric aggregation with the same capped weights as training, not
by the raw example counts: a merchant's claimed session count is untrusted and must not decide alone
(BENCHMARKS.md, poisoning).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedanom.common.policy import PrivacyPolicy
from fedanom.common.records import EVALUATE_METRICS, SCORE_HEAD, to_numpy, to_record
from fedanom.server.aggregation import Arrays, aggregate, capped_weights, weighted_means
from fedanom.server.replies import BadReply, evaluate_reply, failure, train_reply
from fedanom.server.shipping import BackboneShipper

Read = TypeVar("Read")


class CheckedFedAvg(FedAvg):
    """FedAvg's sampling and messages; fedanom's validated aggregation and per-round log."""

    def __init__(
        self,
        *,
        method: str,
        norm_bound: float,
        shipper: BackboneShipper,
        policy: PrivacyPolicy,
        round_offset: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.round_offset = round_offset  # rounds completed before a resume
        self.method = method
        self.norm_bound = norm_bound
        self.shipper = shipper
        self.policy = policy
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

    def read_replies(
        self, replies: Iterable[Message], reader: Callable[[Message], Read]
    ) -> tuple[list[tuple[int, Read]], list[dict[str, Any]], list[tuple[int, str]]]:
        """Each reply read as untrusted input, by merchant: what `reader` made of the usable ones, the
        failures' fixed words, and why the others could not be used."""
        read: list[tuple[int, Read]] = []
        failed: list[dict[str, Any]] = []
        unreadable: list[tuple[int, str]] = []
        for msg in replies:
            node = self.sender(msg)
            if msg.has_error():
                failed.append({"node": node, "reason": failure(msg)})
                continue
            try:
                read.append((node, reader(msg)))
            except BadReply as exc:
                unreadable.append((node, str(exc)))
        return read, failed, unreadable

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        started = time.monotonic()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        unshipped = self.shipper.ensure(grid, [m.metadata.dst_node_id for m in messages])
        self.record = {"round": self.round_offset + server_round, "backbone_failed": _reasons(unshipped)}
        if self.policy.require_dp:
            self.record["policy"] = asdict(self.policy)
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
        read, failed, unreadable = self.read_replies(replies, lambda msg: train_reply(msg, self.policy))
        updates = [update for _, (update, _) in read]
        per_client = {str(node): metrics for node, (_, metrics) in read}
        outcome = aggregate(updates, self.current, method=self.method, norm_bound=self.norm_bound)
        rejected = unreadable + outcome.rejected
        accepted = [u for u in updates if u.node in outcome.weights]
        combined: dict[str, float] = {}
        if accepted:
            losses = [{"train-loss": per_client[str(u.node)]["train-loss"]} for u in accepted]
            combined = {
                **weighted_means(losses, np.array([outcome.weights[u.node] for u in accepted])),
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
        read, failed, unreadable = self.read_replies(replies, evaluate_reply)
        per_client = {str(node): metrics for node, metrics in read}
        rejected = [{"node": node, "reason": reason} for node, reason in unreadable]
        combined: dict[str, float] = {}
        for key in EVALUATE_METRICS[1:]:  # weighted as training is: no claimed count decides alone
            reported = [m for m in per_client.values() if key in m]
            if reported:
                weights = capped_weights([int(m["num-examples"]) for m in reported])
                combined.update(weighted_means([{key: m[key]} for m in reported], weights))
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
