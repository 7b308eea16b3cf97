"""A merchant's reply is untrusted input: read it whole and plausible, or say why it is left out.

One hostile or broken merchant must not end the run. Every reply is checked before anything of it is
used: the records it must carry, its metrics (whitelisted, numeric, finite, in range), its tensors
(decodable). A reply that fails is recorded with the reason in `rounds.jsonl`, and the round goes on
with the others. A failed reply's reason is read from its code alone (`common.records.FAILURES`): the
free text beside it came from the merchant's side and stays unread, so nothing of a merchant's data
reaches the operator's log through it.
"""

from __future__ import annotations

import math

from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedanom.common.policy import PrivacyPolicy
from fedanom.common.records import (
    ACCOUNTANT_METRICS,
    BASE_TRAIN_METRICS,
    EVALUATE_METRICS,
    FAILURES,
    HAS_BACKBONE,
    TRAIN_METRICS,
    to_numpy,
)
from fedanom.server.aggregation import Update

# What a plausible merchant reports: sessions are counted, losses and ε are non-negative, scores are
# rates. A count beyond MAX_EXAMPLES (a billion sessions in one round) is a lie meant to outweigh the rest.
MAX_EXAMPLES = 1e9
RANGES = {
    "num-examples": (1.0, MAX_EXAMPLES),
    "train-loss": (0.0, math.inf),
    "epsilon": (0.0, math.inf),
    "train-seconds": (0.0, math.inf),
    "epsilon-budget": (0.0, math.inf),
    "delta": (0.0, 1.0),
    "noise-multiplier": (0.0, math.inf),
    "sample-rate": (0.0, 1.0),
    "steps": (0.0, 1e12),
    "user-level": (0.0, 1.0),
    "val-surprise": (0.0, math.inf),
    "val-auroc": (0.0, 1.0),
    "val-auprc": (0.0, 1.0),
    "val-auprc-with-head": (0.0, 1.0),
    "val-auprc-without-head": (0.0, 1.0),
}
FLOWER_FAILURES = {
    code: name.lower().replace("_", " ") for name, code in vars(ErrorCode).items() if name.isupper()
}


class BadReply(ValueError):
    """A reply that cannot be used, with the reason the round's log gives."""


def failure(msg: Message) -> str:
    """The fixed words for a failed reply's code (never the merchant's own text)."""
    code = msg.error.code
    return FAILURES.get(code) or FLOWER_FAILURES.get(code) or f"unknown failure code {code}"


def metrics_of(msg: Message, required: tuple[str, ...], allowed: tuple[str, ...]) -> dict[str, float]:
    records = msg.content.metric_records
    if "metrics" not in records:
        raise BadReply("the reply carries no metrics record")
    record = records["metrics"]
    unexpected = sorted(set(record) - set(allowed))
    if unexpected:
        raise BadReply(f"the reply carries metrics outside the whitelist: {', '.join(unexpected[:3])}")
    values = {}
    for key in allowed:
        if key not in record:
            if key in required:
                raise BadReply(f"the reply has no '{key}'")
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadReply(f"'{key}' is not a number")
        low, high = RANGES[key]
        if not low <= float(value) <= high:  # NaN fails too
            raise BadReply(f"'{key}' is {float(value):.4g}, outside [{low:g}, {high:g}]")
        values[key] = float(value)
    for key in ("num-examples", "steps"):  # counts: finite (the ranges) and whole
        if key in values and values[key] != int(values[key]):
            raise BadReply(f"'{key}' is not a whole number")
    return values


def train_reply(msg: Message, policy: PrivacyPolicy) -> tuple[Update, dict[str, float]]:
    """The merchant's update and its training metrics, or BadReply (also for an accountant summary
    that breaks the federation's privacy policy)."""
    # the accountant's summary is checked where a policy asks for it (a merchant of an earlier version
    # sends none, and takes part in a federation without one)
    required = (*BASE_TRAIN_METRICS, *ACCOUNTANT_METRICS) if policy.require_dp else BASE_TRAIN_METRICS
    metrics = metrics_of(msg, required, TRAIN_METRICS)
    violation = policy.violation(metrics)
    if violation:
        raise BadReply(violation)
    if "arrays" not in msg.content.array_records:
        raise BadReply("the reply carries no arrays record")
    try:
        arrays = to_numpy(msg.content.array_records["arrays"])
    except Exception:  # any bytes at all can arrive: none of them may end the round
        raise BadReply("the reply's arrays do not decode") from None
    node = msg.metadata.src_node_id
    return Update(node=node, arrays=arrays, examples=int(metrics["num-examples"])), metrics


def evaluate_reply(msg: Message) -> dict[str, float]:
    return metrics_of(msg, EVALUATE_METRICS[:2], EVALUATE_METRICS)


def backbone_answer(msg: Message) -> bool:
    """A merchant's answer to whether it holds the backbone: exactly one true/false value."""
    records = msg.content.config_records
    answer = records["backbone"].get(HAS_BACKBONE) if "backbone" in records else None
    if not isinstance(answer, bool):
        raise BadReply("the reply does not say whether it holds the backbone")
    return answer
