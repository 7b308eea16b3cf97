"""Server-side aggregation: malformed or implausible replies are rejected, never averaged; no merchant
pulls the global adapter further than a bound that holds however many others collude."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedanom.common.errors import FedanomError
from fedanom.common.policy import PrivacyPolicy
from fedanom.common.records import ACCOUNTANT_METRICS, FAILURES, MERCHANT_SETUP
from fedanom.server.aggregation import AGGREGATORS, IMPLAUSIBLE, WEIGHT_CAP, Update, aggregate
from fedanom.server.checkpoints import RoundProgress, rewrite_round_log, write_round
from fedanom.server.replies import BadReply, evaluate_reply, failure, train_reply
from fedanom.server.shipping import BackboneShipper
from fedanom.server.strategy import CheckedFedAvg

REFERENCE = {"b1": np.zeros((4, 2), dtype=np.float32), "b2": np.zeros(3, dtype=np.float32)}
BOUND = 1e3  # far above every honest change below (norm sqrt(11) * value)


def update(node: int, value: float, examples: int = 10) -> Update:
    return Update(node, {k: np.full_like(v, value) for k, v in REFERENCE.items()}, examples)


def test_fedavg_weights_by_examples_exactly() -> None:
    updates = [update(1, 1.0, 10), update(2, 4.0, 30), update(3, 2.0, 20)]
    outcome = aggregate(updates, REFERENCE, method="fedavg", norm_bound=BOUND)
    assert outcome.rejected == [] and outcome.clipped == {}
    assert outcome.merged is not None
    np.testing.assert_allclose(outcome.merged["b1"], 170 / 60)  # (1*10 + 4*30 + 2*20) / 60
    assert outcome.merged["b1"].dtype == np.float32


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (
            Update(9, {"b1": np.full((4, 2), np.nan, np.float32), "b2": np.zeros(3, np.float32)}, 10),
            "non-finite",
        ),
        (Update(9, {"b1": np.zeros((2, 4), np.float32), "b2": np.zeros(3, np.float32)}, 10), "shape"),
        (Update(9, {"b1": np.zeros((4, 2), np.float64), "b2": np.zeros(3, np.float32)}, 10), "dtype"),
        (Update(9, {"b1": np.zeros((4, 2), np.float32)}, 10), "tensors differ"),
        (update(9, 1e6), f"over {IMPLAUSIBLE:g} times the bound"),
        (update(9, 1.0, examples=0), "training examples"),
    ],
)
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_bad_updates_are_rejected_and_the_global_stays_finite(
    broken: Update, reason: str, method: str
) -> None:
    honest = [update(1, 1.0), update(2, 1.2), update(3, 0.8)]
    outcome = aggregate([*honest, broken], REFERENCE, method=method, norm_bound=BOUND)
    assert [node for node, _ in outcome.rejected] == [9]
    assert reason in outcome.rejected[0][1]
    assert outcome.merged is not None
    for value in outcome.merged.values():
        assert np.isfinite(value).all()
        assert np.all((value >= 0.8) & (value <= 1.2))


@pytest.mark.parametrize("attackers", [1, 2])
def test_scaled_updates_are_clipped_to_the_bound_even_from_a_majority(attackers: int) -> None:
    """Two of three merchants sending 8x-bound changes (under a median-based bound they passed): each
    counts with the bound's norm, so the global moves at most the bound."""
    bound = 5.0  # honest change norm sqrt(11) = 3.3
    scaled = [update(10 + k, 8 * bound / np.sqrt(11)) for k in range(attackers)]
    honest = [update(k, 1.0) for k in range(3 - attackers)]
    outcome = aggregate([*honest, *scaled], REFERENCE, method="fedavg", norm_bound=bound)
    assert outcome.rejected == [] and sorted(outcome.clipped) == [10 + k for k in range(attackers)]
    assert outcome.merged is not None
    merged_norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in outcome.merged.values()))
    assert merged_norm <= bound + 1e-4


def test_a_claimed_count_cannot_outweigh_the_others() -> None:
    """A sign-flipped update claiming a billion sessions weighs at most WEIGHT_CAP times the lower median
    count, and at most the others together: the global keeps the honest sign. Claiming one session
    shrinks the liar's own weight and at most evens out the others'."""
    honest = [update(1, 1.0, 100), update(2, 1.0, 120)]
    outcome = aggregate([*honest, update(9, -1.0, 10**9)], REFERENCE, method="fedavg", norm_bound=BOUND)
    assert outcome.weights == {1: 100, 2: 120, 9: 220}
    assert outcome.merged is not None and np.all(outcome.merged["b2"] >= 0.0)
    many = [*(update(k, 1.0, 100) for k in range(12)), update(99, -1.0, 10**9)]
    assert aggregate(many, REFERENCE, method="fedavg", norm_bound=BOUND).weights[99] == WEIGHT_CAP * 100
    modest = aggregate([*honest, update(9, -1.0, 1)], REFERENCE, method="fedavg", norm_bound=BOUND)
    assert modest.weights == {1: 100, 2: 101, 9: 1}  # the others' caps: 121 and 101


def test_trimmed_mean_cuts_the_extremes_from_three_updates_on() -> None:
    outcome = aggregate(
        [update(1, 1.0), update(2, 1.1), update(3, -50.0)], REFERENCE, method="trimmed-mean", norm_bound=BOUND
    )
    assert outcome.merged is not None and np.allclose(outcome.merged["b1"], 1.0)


def test_nothing_valid_leaves_the_global_unchanged() -> None:
    outcome = aggregate([update(1, np.inf)], REFERENCE, method="fedavg", norm_bound=BOUND)
    assert outcome.merged is None and len(outcome.rejected) == 1


def test_median_and_trimmed_mean_resist_one_outlier_within_the_bound() -> None:
    updates = [update(1, 1.0), update(2, 1.1), update(3, 0.9), update(4, 1.05), update(5, 3.0)]
    for method in ("median", "trimmed-mean"):
        outcome = aggregate(updates, REFERENCE, method=method, norm_bound=BOUND)
        assert outcome.merged is not None and np.all(outcome.merged["b1"] < 1.2), method


def reply(content: RecordDict | Error, node: int = 7) -> Message:
    """A merchant's reply as the server receives it (from node 7 unless said)."""
    metadata = Metadata(1, "m", node, 0, "instruction", "", 0.0, 60.0, MessageType.TRAIN)
    if isinstance(content, Error):
        return Message(metadata=metadata, error=content)  # type: ignore[call-overload]
    return Message(metadata=metadata, content=content)  # type: ignore[call-overload]


GOOD_METRICS = {
    "num-examples": 120.0,
    "train-loss": 2.5,
    "epsilon": 2.5,  # at least what this round's noise, sampling rate and steps spend (2.43)
    "train-seconds": 3.0,
    "epsilon-budget": 4.0,
    "delta": 1 / 120,
    "noise-multiplier": 1.1,
    "sample-rate": 0.5,
    "steps": 2.0,
    "user-level": 0.0,
}
ANY = PrivacyPolicy()


def train_content(metrics: Mapping[str, object] | None, arrays: ArrayRecord | None) -> RecordDict:
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)  # type: ignore[arg-type]
    if arrays is not None:
        records["arrays"] = arrays
    return RecordDict(records)


GOOD_ARRAYS = ArrayRecord({name: Array(value) for name, value in REFERENCE.items()})


def test_a_well_formed_train_reply_reads_whole() -> None:
    update, metrics = train_reply(reply(train_content(GOOD_METRICS, GOOD_ARRAYS)), ANY)
    assert update.node == 7 and update.examples == 120 and metrics == GOOD_METRICS
    assert {k: v.shape for k, v in update.arrays.items()} == {k: v.shape for k, v in REFERENCE.items()}


@pytest.mark.parametrize(
    ("metrics", "arrays", "reason"),
    [
        ({**GOOD_METRICS, "num-examples": float("nan")}, GOOD_ARRAYS, "'num-examples' is nan"),
        ({**GOOD_METRICS, "num-examples": float("inf")}, GOOD_ARRAYS, "'num-examples' is inf"),
        ({**GOOD_METRICS, "num-examples": 1e12}, GOOD_ARRAYS, "outside [1, 1e+09]"),
        ({**GOOD_METRICS, "num-examples": 12.5}, GOOD_ARRAYS, "not a whole number"),
        ({**GOOD_METRICS, "steps": 2.5}, GOOD_ARRAYS, "'steps' is not a whole number"),
        ({**GOOD_METRICS, "steps": float("inf")}, GOOD_ARRAYS, "'steps' is inf"),
        ({**GOOD_METRICS, "epsilon": -1.0}, GOOD_ARRAYS, "'epsilon' is -1"),
        ({**GOOD_METRICS, "train-loss": [1.0, 2.0]}, GOOD_ARRAYS, "'train-loss' is not a number"),
        ({k: v for k, v in GOOD_METRICS.items() if k != "epsilon"}, GOOD_ARRAYS, "no 'epsilon'"),
        ({**GOOD_METRICS, "user-emails": 3.0}, GOOD_ARRAYS, "outside the whitelist: user-emails"),
        (None, GOOD_ARRAYS, "no metrics record"),
        (GOOD_METRICS, None, "no arrays record"),
        (
            GOOD_METRICS,
            ArrayRecord({"b1": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage")}),
            "do not decode",
        ),
    ],
)
def test_an_implausible_train_reply_is_refused_with_its_reason(
    metrics: Mapping[str, object] | None, arrays: ArrayRecord | None, reason: str
) -> None:
    with pytest.raises(BadReply, match=re.escape(reason)):
        train_reply(reply(train_content(metrics, arrays)), ANY)


def test_a_merchant_of_an_earlier_version_takes_part_unless_a_policy_wants_its_accountant() -> None:
    earlier = {k: v for k, v in GOOD_METRICS.items() if k not in ACCOUNTANT_METRICS}
    assert train_reply(reply(train_content(earlier, GOOD_ARRAYS)), ANY)[1] == earlier
    with pytest.raises(BadReply, match="no 'epsilon-budget'"):
        train_reply(reply(train_content(earlier, GOOD_ARRAYS)), PrivacyPolicy(require_dp=True))
    assert PrivacyPolicy.from_config({}) == ANY  # and a server of an earlier version states no policy
    with pytest.raises(FedanomError, match="is not one"):
        PrivacyPolicy.from_config({"require-dp": True, "max-epsilon": float("nan")})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"epsilon-budget": 8.0}, "its accountant reports ε=8, above the federation's maximum ε=4"),
        ({"epsilon": 4.5}, "its accountant reports ε=4.5, above the federation's maximum ε=4"),
        ({"noise-multiplier": 0.0}, "reports no DP noise, and the federation requires DP"),
        ({"delta": 0.02}, "δ=0.02 is above the federation's maximum δ=0.01"),
        ({"user-level": 1.0}, "counted a shopper as the unit, and the federation's policy is per session"),
        ({"epsilon": 1.2}, "ε=1.2, less than this round's own noise, sampling rate and steps spend (ε=2.43)"),
        ({"noise-multiplier": 1e9}, "a noise multiplier of 1e+09, more than a ledger plans"),
        ({"steps": 0.0}, "its accountant reports no training step this round"),
    ],
)
def test_a_train_reply_that_breaks_the_privacy_policy_is_refused(
    change: dict[str, float], reason: str
) -> None:
    policy = PrivacyPolicy(require_dp=True, max_epsilon=4.0, max_delta=0.01, privacy_unit="session")
    assert train_reply(reply(train_content(GOOD_METRICS, GOOD_ARRAYS)), policy)[1] == GOOD_METRICS
    unsaid = {
        k: v for k, v in GOOD_METRICS.items() if k != "user-level"
    }  # an earlier version counted sessions
    assert train_reply(reply(train_content(unsaid, GOOD_ARRAYS)), policy)[1] == unsaid
    with pytest.raises(BadReply, match=re.escape(reason)):
        train_reply(reply(train_content({**GOOD_METRICS, **change}, GOOD_ARRAYS)), policy)


def test_an_evaluate_reply_needs_counted_sessions_and_rates_in_range() -> None:
    good = {"num-examples": 40, "val-surprise": 3.1, "val-auroc": 0.9}
    assert evaluate_reply(reply(RecordDict({"metrics": MetricRecord(good)}))) == good  # type: ignore[arg-type]
    for bad, reason in (
        ({"val-surprise": 3.1}, "no 'num-examples'"),
        ({**good, "val-auroc": 1.5}, "outside"),
    ):
        with pytest.raises(BadReply, match=reason):
            evaluate_reply(reply(RecordDict({"metrics": MetricRecord(bad)})))  # type: ignore[arg-type]


WITH, WITHOUT = "val-auprc-with-head", "val-auprc-without-head"


def test_the_labelled_merchants_validation_decides_the_head_for_the_others(tiny_backbone: Path) -> None:
    """Example-weighted: the large merchant's head costs more AUPRC than the small one's gains."""
    shipper = BackboneShipper(tiny_backbone, 1.0)
    strategy = CheckedFedAvg(method="fedavg", norm_bound=BOUND, shipper=shipper, policy=ANY)
    assert strategy.score_head  # until labelled merchants have measured it
    for large, small, decided in (((0.6, 0.8), (0.9, 0.7), False), ((0.8, 0.8), (0.9, 0.7), True)):
        strategy.record, strategy.clock = {"seconds": {}}, {"evaluate_sent": 0.0}
        replies = [
            reply(RecordDict({"metrics": MetricRecord(metrics)}), node)  # type: ignore[arg-type]
            for node, metrics in (
                (1, {"num-examples": 300, "val-surprise": 3.0, WITH: large[0], WITHOUT: large[1]}),
                (2, {"num-examples": 100, "val-surprise": 3.0, WITH: small[0], WITHOUT: small[1]}),
                (4, {"num-examples": 200, "val-surprise": 3.0, WITH: 0.7, WITHOUT: 0.7}),  # indifferent
                (3, {"num-examples": 900, "val-surprise": 3.0}),  # no labels: it has no say
            )
        ]
        strategy.aggregate_evaluate(1, replies)
        assert strategy.score_head is decided


def test_a_failure_is_read_from_its_code_never_from_the_merchants_text() -> None:
    leaked = "bad row 17: alice@example.com,4111 1111 1111 1111 in /home/alice/exports/events.csv"
    assert failure(reply(Error(code=MERCHANT_SETUP, reason=leaked))) == FAILURES[MERCHANT_SETUP]
    assert failure(reply(Error(code=2, reason=leaked))) == "client app raised exception"
    assert failure(reply(Error(code=999, reason=leaked))) == "unknown failure code 999"


def test_a_merchant_that_went_away_is_logged_by_its_own_node_id(tiny_backbone: Path) -> None:
    """The SuperLink answers for a dead merchant from its own node id (1); the round's log names the
    merchant the instruction went to."""
    shipper = BackboneShipper(tiny_backbone, 1.0)
    strategy = CheckedFedAvg(method="fedavg", norm_bound=BOUND, shipper=shipper, policy=ANY)
    strategy.current = REFERENCE
    strategy.record, strategy.clock = {"seconds": {}}, {"train_sent": 0.0, "backbone_check": 0.0}
    metadata = Metadata(1, "instruction-to-4242", 1, 4242, "", "", time.time(), 60.0, MessageType.TRAIN)
    instruction = Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]
    strategy.sent = [instruction]
    gone = create_message_error_unavailable_res_message(instruction.metadata, "node_unavail")
    strategy.aggregate_train(1, [gone])
    assert strategy.record["failed"] == [{"node": 4242, "reason": "node unavailable"}]


def test_the_operator_sees_each_round_once_even_when_a_resumed_run_rewrites_the_log(tmp_path: Path) -> None:
    def record(k: int, failed: int = 0) -> dict[str, object]:
        reasons = [{"node": n, "reason": "node unavailable"} for n in range(failed)]
        return {"round": k, "accepted": [7, 8], "rejected": [], "failed": reasons, "backbone_failed": []}

    write_round(tmp_path, 1, record(1, failed=1), {"w": np.zeros(2)})
    lines: list[str] = []
    progress = RoundProgress(tmp_path, 3, lines.append, resumed=True)  # round 1 was done before
    rewrite_round_log(tmp_path, 1)  # what a resumed ServerApp does first
    with open(tmp_path / "rounds.jsonl", "a") as log:
        log.write('{"round": 2, "acc')  # a line still being written
    progress()
    assert lines == []
    rewrite_round_log(tmp_path, 1)
    write_round(tmp_path, 2, record(2, failed=2), {"w": np.zeros(2)})
    progress()
    progress()
    assert len(lines) == 1 and lines[0].startswith(
        "round 2 of 3: 2 updates accepted, 0 rejected, 2 merchants"
    )
    assert "(node unavailable)" in lines[0] and lines[0].endswith(" left")
    write_round(tmp_path, 3, record(3), {"w": np.zeros(2)})
    progress()
    assert lines[1].startswith("round 3 of 3: 2 updates accepted, 0 rejected, 0 merchants failed;")
    assert not lines[1].endswith(" left")
    fresh: list[str] = []
    RoundProgress(tmp_path, 3, fresh.append, resumed=False)()  # a fresh run reports whatever it writes
    assert [line.split(":")[0] for line in fresh] == ["round 1 of 3", "round 2 of 3", "round 3 of 3"]
