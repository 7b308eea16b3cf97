"""Typed access to Flower records, shared by the ServerApp and the ClientApp.

Flower's config and metric values are broad unions (numbers, strings, bytes, lists); fedanom's are
numbers and strings, and a wrong type in a run or node config is a user's mistake, said in one sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedanom.common.errors import FedanomError
from fedanom.common.settings import RUN_DEFAULTS, LoraSettings

# What a merchant reports: the whole list. After training a round, all of TRAIN_METRICS; after evaluating
# the global adapter, "num-examples" and "val-surprise", plus "val-auroc" / "val-auprc" when it holds labels,
# and with an anomaly head the AUPRC of its unsupervised kinds of evidence summed with and without the head.
# A merchant's accountant, after the round: its whole budget, what it has spent so far ("epsilon"), its δ,
# and this round's noise multiplier, Poisson sampling rate and steps (0 noise: trained without DP); the
# server checks them against the federation's privacy policy (`common.policy`).
ACCOUNTANT_METRICS = ("epsilon-budget", "delta", "noise-multiplier", "sample-rate", "steps")
BASE_TRAIN_METRICS = ("num-examples", "train-loss", "epsilon", "train-seconds")  # every version sends these
# 1 when the unit DP counted was a shopper, 0 for a session; a merchant of an earlier version counted
# sessions and does not say so
USER_LEVEL = "user-level"
TRAIN_METRICS = (*BASE_TRAIN_METRICS, *ACCOUNTANT_METRICS, USER_LEVEL)
EVALUATE_METRICS = (
    "num-examples",
    "val-surprise",
    "val-auroc",
    "val-auprc",
    "val-auprc-with-head",
    "val-auprc-without-head",
)
# The server's word to every merchant, each evaluation, on whether a score its labels cannot check sums the
# anomaly head: the labelled merchants' validation AUPRC with and without it, in the round before
SCORE_HEAD = "score-head"
HAS_BACKBONE = "has-backbone"  # a merchant's whole answer to the server's backbone query
Metrics = dict[str, int | float | list[int] | list[float]]


def number(config: Mapping[str, object], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FedanomError(f"config value '{key}' must be a number, not {value!r}")
    return float(value)


def flag(config: Mapping[str, object], key: str) -> bool:
    """A true/false setting (its RUN_DEFAULTS value when absent): a string such as "false" is a mistake
    to name, never a silent false (or a silently disabled DP)."""
    value = config.get(key, RUN_DEFAULTS[key])
    if not isinstance(value, bool):
        raise FedanomError(f"config value '{key}' must be true or false, not {value!r}")
    return value


def text(config: Mapping[str, object], key: str, default: str = "") -> str:
    value = config.get(key, default)
    if not isinstance(value, str):
        raise FedanomError(f"config value '{key}' must be text, not {value!r}")
    return value


# The only failures a merchant reports: a code, whose fixed words are the whole reason that leaves it.
# The details (a bad row, a file path) stay in the merchant's own log.
BUDGET_EXHAUSTED = 4001
BACKBONE_REFUSED = 4002
MERCHANT_SETUP = 4003
MERCHANT_FAILED = 4004
POLICY_REFUSED = 4005
FAILURES = {
    BUDGET_EXHAUSTED: "privacy budget exhausted",
    BACKBONE_REFUSED: "the shipped backbone did not match its announced hash",
    MERCHANT_SETUP: "the merchant's data or settings are unusable (details in its own log)",
    MERCHANT_FAILED: "the merchant failed (details in its own log)",
    POLICY_REFUSED: "the merchant's privacy terms do not meet the federation's policy",
}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """Numpy arrays or CPU tensors (whatever `np.asarray` reads) as an ArrayRecord, without torch."""
    return ArrayRecord({name: Array.from_numpy_ndarray(np.asarray(value)) for name, value in arrays.items()})


def lora_settings(config: Mapping[str, object]) -> LoraSettings:
    """The adapter settings a federation's run config names (`lora-rank`, `lora-alpha`, `lora-seed`,
    `lora-targets`: comma-separated linear layers, empty for the architecture's default;
    `supervised-head`: the adapter carries the anomaly head that merchants with labels train)."""
    return LoraSettings(
        rank=int(number(config, "lora-rank")),
        alpha=int(number(config, "lora-alpha")),
        seed=int(number(config, "lora-seed")),
        targets=tuple(t.strip() for t in text(config, "lora-targets").split(",") if t.strip()),
        supervised_head=flag(config, "supervised-head"),
    )
