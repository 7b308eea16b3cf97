"""The federated run on Flower's Simulation Engine: the same ServerApp and ClientApp code as deployment.

Three virtual merchants with their own (synthetic) shops, two rounds, an adapter with the anomaly head
(only the first merchant knows some of its attacks, so the head is trained by one merchant and carried by
all). Checked: every update is accepted and averaged, each merchant's ε accumulates across rounds within
its budget, checkpoints and the final global adapter are written, every merchant keeps a calibrated
global detector, and nothing but LoRA B and head tensors and whitelisted metrics ever leaves a merchant
(a Flower mod records every outgoing message).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.simulation import run_simulation
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedanom.client import app as merchant_app
from fedanom.client.merchant import Merchant, VirtualMerchants
from fedanom.client.rounds import train_round
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.model import HEAD
from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.policy import PolicyRefused
from fedanom.common.presets import resolve_preset
from fedanom.common.records import (
    FAILURES,
    HAS_BACKBONE,
    MERCHANT_SETUP,
    POLICY_REFUSED,
    flag,
    lora_settings,
    to_numpy,
    to_record,
)
from fedanom.common.settings import AGGREGATIONS, EPSILON, RUN_DEFAULTS, RunSettings
from fedanom.common.windows import Windows
from fedanom.server.aggregation import AGGREGATORS
from fedanom.server.app import build_app
from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

SPY_DIR = "FEDANOM_TEST_SPY_DIR"


def record_outgoing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: write down what every reply carries, before it leaves the merchant."""
    reply = call_next(msg, context)
    seen = {"type": msg.metadata.message_type, "error": reply.has_error()}
    if not reply.has_error():
        seen["records"] = {
            name: {"kind": type(record).__name__, "keys": sorted(record.keys())}
            for name, record in reply.content.items()
        }
    spy = Path(os.environ[SPY_DIR]) / f"{uuid.uuid4().hex}.json"  # Ray runs merchants in several processes
    spy.write_text(json.dumps(seen))
    return reply


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    root = tmp_path_factory.mktemp("federation")
    shutil.copytree(tiny_backbone, root / "base")
    files: list[Path] = []
    for i in range(3):
        shop = generate_shop(ShopConfig(n_events=2_500 + 1_000 * i, n_users=300, n_items=900), seed=60 + i)
        events = inject(shop, {"scraping-crude": 3}, seed=i)
        files.append(write_taobao_csv(events, root / f"merchant-{i}.csv"))
        if i == 0:  # the first merchant knows its bots
            bots = events[events.attack != ""].user_id.unique()
            (root / "labels-0.csv").write_text("user_id,label\n" + "".join(f"{u},1\n" for u in bots))
    spy = root / "spy"
    spy.mkdir()
    virtual = VirtualMerchants(
        data=tuple(files),
        state_root=root / "state",
        base=root / "base",
        epsilon=EPSILON,
        labels=(root / "labels-0.csv", None, None),
    )
    client = merchant_app.make_client_app(mods=[record_outgoing], merchants=virtual)
    overrides: dict[str, bool | float | int | str] = {
        "num-server-rounds": 2,
        "min-nodes": 3,
        "base": str(root / "base"),
        "run-dir": str(root / "run"),
        "round-timeout": 300.0,
        "supervised-head": True,
    }
    try:
        os.environ[SPY_DIR] = str(spy)  # Ray's workers inherit the environment
        run_simulation(
            server_app=build_app(overrides),
            client_app=client,
            num_supernodes=3,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2},
            },
        )
    finally:
        os.environ.pop(SPY_DIR)  # the other tests' merchants record nothing
    return root


def sent(tensor: str) -> str:
    """Which part of the adapter a tensor name belongs to: "lora_B", the anomaly head, or its own name."""
    return next((part for part in ("lora_B", HEAD) if part in tensor), tensor)


def rounds(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "run" / "rounds.jsonl").read_text().splitlines()]


def test_every_round_averages_every_merchant(federation: Path) -> None:
    log = rounds(federation)
    assert [r["round"] for r in log] == [1, 2]
    for r in log:
        assert len(r["accepted"]) == 3 and r["rejected"] == [] and r["failed"] == []
        assert r["backbone_failed"] == [] and r["train"]["num-examples"] > 0
        # the server's round trip includes the slowest merchant's own training
        assert r["seconds"]["train_round_trip"] >= max(c["train-seconds"] for c in r["clients"].values())
        # federated evaluation: every merchant scored its validation sessions with the new global adapter
        assert len(r["evaluate"]["clients"]) == 3 and r["evaluate"]["failed"] == []
        assert r["score_head"] is True or r["round"] > 1  # the head stays until labels have measured it
        assert all(c["num-examples"] > 0 for c in r["evaluate"]["clients"].values())
        assert np.isfinite(r["evaluate"]["combined"]["val-surprise"])
        assert json.loads((federation / "run" / f"round-{r['round']}" / "metrics.json").read_text()) == r
    for k in (1, 2):
        with np.load(federation / "run" / f"round-{k}" / "adapter.npz") as adapter:
            assert {sent(name) for name in adapter.files} == {"lora_B", HEAD}
            assert all(np.isfinite(adapter[name]).all() for name in adapter.files)
    with (
        np.load(federation / "run" / "round-1" / "adapter.npz") as one,
        np.load(federation / "run" / "round-2" / "adapter.npz") as two,
    ):
        assert any(not np.array_equal(one[name], two[name]) for name in one.files)


def test_merchants_without_labels_send_the_head_back_unchanged(federation: Path) -> None:
    """Their only gradient for the head would be DP noise: it must not move the federation's head."""
    with np.load(federation / "run" / "round-1" / "adapter.npz") as received:
        for i in range(3):
            (reply,) = (federation / "state" / f"merchant-{i}" / "replies").glob("round-2-*.npz")
            with np.load(reply) as answer:
                heads = [name for name in received.files if HEAD in name]
                same = [np.array_equal(answer[name], received[name]) for name in heads]
                assert heads and all(same) == (i > 0), f"merchant {i}"


def test_privacy_accumulates_per_merchant_within_budget(federation: Path) -> None:
    first, second = rounds(federation)
    for node, metrics in second["clients"].items():
        assert first["clients"][node]["epsilon"] < metrics["epsilon"] <= EPSILON
    for i in range(3):
        ledger = json.loads((federation / "state" / f"merchant-{i}" / "privacy.json").read_text())
        # both rounds' steps are on record (one epoch a round = 1/q steps), kept across stateless ClientApp
        # calls; a consistent plan gives both rounds the same noise, so Opacus merges them into one entry
        sample_rate = ledger["history"][0][1]
        assert sum(steps for _, _, steps in ledger["history"]) == 2 * round(1 / sample_rate)


def test_only_adapter_tensors_and_whitelisted_metrics_leave_a_merchant(federation: Path) -> None:
    seen = [json.loads(p.read_text()) for p in (federation / "spy").glob("*.json")]
    # (train + evaluate) x 3 merchants x 2 rounds, and each merchant's answer to the backbone query
    assert len(seen) == 2 * 3 * 2 + 3
    for message in seen:
        assert not message["error"]
        for name, record in message["records"].items():
            if record["kind"] == "ArrayRecord":
                assert name == "arrays" and {sent(k) for k in record["keys"]} == {"lora_B", HEAD}
            elif message["type"] == "query":
                assert record == {"kind": "ConfigRecord", "keys": [HAS_BACKBONE]} and name == "backbone"
            else:
                assert record["kind"] == "MetricRecord" and name == "metrics"
                assert set(record["keys"]) <= set(merchant_app.METRIC_KEYS)


def test_final_global_adapter_and_merchant_detectors(federation: Path) -> None:
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(federation / "base"), federation / "run" / "global" / "adapter"
    )
    # plain peft loads the last round's aggregate: the adapter the merchants' detectors were built on
    loaded = {name: p.detach().numpy() for name, p in plain.named_parameters()}
    with np.load(federation / "run" / "round-2" / "adapter.npz") as last:
        lora = {name: last[name] for name in last.files if "lora_" in name}
    assert lora and all(np.array_equal(loaded[name], value) for name, value in lora.items())
    for i in range(3):
        detector = BehaviourDetector.load(federation / "state" / f"merchant-{i}" / "detector")
        assert detector.provenance["federated_round"] == 2
        assert detector.lora.supervised_head and detector.score_mix is not None  # the global head scores
        ingested = ingest(
            federation / f"merchant-{i}.csv", resolve_preset("taobao"), popularity=detector.popularity
        )
        windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
        assert np.isfinite(detector.decision_function(windows)).all()


def test_run_defaults_match_pyproject() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RUN_DEFAULTS


def test_a_true_false_setting_written_as_text_is_refused_not_read_as_false() -> None:
    with pytest.raises(FedanomError, match="'dp' must be true or false, not 'false'"):
        flag({"dp": "false"}, "dp")
    assert flag({}, "dp") is True and flag({}, "supervised-head") is False
    assert lora_settings({**RUN_DEFAULTS, "supervised-head": True}).supervised_head


def test_the_run_config_is_read_typed_and_a_wrong_type_is_refused() -> None:
    settings = RunSettings.from_config({"num-server-rounds": 5, "round-timeout": 30, "resume": True})
    assert (settings.num_server_rounds, settings.round_timeout, settings.resume) == (5, 30.0, True)
    assert settings.to_config() == {
        **RUN_DEFAULTS,
        "num-server-rounds": 5,
        "round-timeout": 30.0,
        "resume": True,
    }
    for key, value, wanted in [
        ("resume", "false", "true or false"),
        ("num-server-rounds", 2.5, "a whole number"),
        ("round-timeout", "60", "a number"),
        ("base", 3, "text"),
    ]:
        with pytest.raises(FedanomError, match=f"'{key}' must be {wanted}"):
            RunSettings.from_config({key: value})
    with pytest.raises(FedanomError, match="aggregation must be one of"):
        RunSettings.from_config({"aggregation": "mean"})
    assert set(AGGREGATORS) == set(AGGREGATIONS)  # the names the options offer are the ones the server has


CORRUPT = "FEDANOM_TEST_CORRUPT"  # partition-id=kind,... : which merchants send which broken update


def corrupt_updates(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod standing in for a buggy or malicious merchant: it breaks its own outgoing update."""
    reply = call_next(msg, context)
    plan = dict(item.split("=") for item in os.environ.get(CORRUPT, "").split(",") if item)
    kind = plan.get(str(context.node_config["partition-id"]))
    if kind and msg.metadata.message_type == "train" and not reply.has_error():
        arrays = to_numpy(reply.content.array_records["arrays"])
        name = sorted(arrays)[0]
        if kind == "nan":
            arrays[name] = np.full_like(arrays[name], np.nan)
        elif kind == "shape":
            arrays[name] = np.zeros((*arrays[name].shape, 2), dtype=arrays[name].dtype)
        elif kind == "huge":
            arrays = {k: v + 1e4 for k, v in arrays.items()}
        else:  # a count: "nan-count" or "inflated-count"
            count = float("nan") if kind == "nan-count" else 1e12
            reply.content.metric_records["metrics"]["num-examples"] = count
        reply.content["arrays"] = to_record(arrays)
    return reply


def simulate(
    root: Path,
    run: str,
    merchants: list[Path],
    state: str,
    epsilon: float = EPSILON,
    **overrides: bool | float | int | str,
) -> list[dict[str, Any]]:
    virtual = VirtualMerchants(tuple(merchants), root / state, root / "base", epsilon)
    client = merchant_app.make_client_app(mods=[corrupt_updates], merchants=virtual)
    config: dict[str, bool | float | int | str] = {
        "num-server-rounds": 1,
        "min-nodes": len(merchants),
        "base": str(root / "base"),
        "run-dir": str(root / run),
        "round-timeout": 300.0,
        **overrides,
    }
    run_simulation(
        server_app=build_app(config),
        client_app=client,
        num_supernodes=len(merchants),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    return [json.loads(line) for line in (root / run / "rounds.jsonl").read_text().splitlines()]


def test_a_hostile_merchant_is_rejected_with_its_reason_and_the_round_goes_on(federation: Path) -> None:
    """Broken tensors, a huge change, a NaN and an inflated session count, and a failure over a bad row
    carrying an e-mail address: each is left out with its reason in rounds.jsonl, nothing of the bad row
    reaches it, and the round averages the two honest merchants."""
    leak = federation / "alice@example.com.csv"
    leak.write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\nalice@example.com,4111111111111111,1,pv,soon\n"
    )
    merchants = [federation / f"merchant-{i % 3}.csv" for i in range(7)] + [leak]
    os.environ[CORRUPT] = "0=nan,1=shape,2=huge,3=nan-count,4=inflated-count"
    try:
        (log,) = simulate(federation, "poisoned", merchants, "state-poisoned")
    finally:
        os.environ.pop(CORRUPT)
    reasons = sorted(r["reason"] for r in log["rejected"])
    assert len(log["accepted"]) == 2 and len(reasons) == 5
    for expected in ("non-finite", "shape", "times the bound", "'num-examples' is nan", "outside [1, 1e+09]"):
        assert any(expected in r for r in reasons), expected
    assert [f["reason"] for f in log["failed"]] == [FAILURES[MERCHANT_SETUP]]
    written = (federation / "poisoned" / "rounds.jsonl").read_text()
    # the whole card number: a random 19-digit node id holds "4111" now and then (it did in CI)
    assert "alice" not in written and "4111111111111111" not in written
    assert sorted(log["weights"]) == sorted(str(node) for node in log["accepted"]) and log["clipped"] == []
    with np.load(federation / "poisoned" / "round-1" / "adapter.npz") as adapter:
        assert all(
            np.isfinite(adapter[name]).all() and np.abs(adapter[name]).max() < 1.0 for name in adapter.files
        )


def test_a_spent_budget_is_answered_not_overdrawn(federation: Path) -> None:
    merchants = [federation / f"merchant-{i}.csv" for i in range(3)]
    policy: dict[str, bool | float] = {"require-dp": True, "max-epsilon": 4.0}  # theirs, 1.0, conforms
    first = simulate(federation, "budget-1", merchants, "budget", epsilon=1.0, **policy)
    assert all(len(r["accepted"]) == 3 for r in first)
    (logged,) = first
    assert logged["policy"] == {
        "require_dp": True,
        "max_epsilon": 4.0,
        "max_delta": 0.0,
        "privacy_unit": "user",
    }
    for summary in logged["clients"].values():  # each merchant's accountant, as the server checked it
        assert 0 < summary["epsilon"] <= summary["epsilon-budget"] == 1.0
        assert summary["noise-multiplier"] > 0 and 0 < summary["sample-rate"] <= 1 and summary["steps"] >= 1
        shoppers = 1 / summary["delta"]  # δ defaults to 1 / the shoppers among its training windows
        assert shoppers == pytest.approx(round(shoppers)) and 1 < shoppers <= summary["num-examples"]
    report = subprocess.run(
        [sys.executable, "-m", "fedanom", "privacy", "report", str(federation / "budget-1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert (
        "DP required, max epsilon 4" in report.stdout
        and (federation / "budget-1" / "privacy.png").stat().st_size
    )
    for node, summary in logged["clients"].items():
        assert re.search(rf"{node}\s+│\s+{summary['epsilon']:.3f}", report.stdout), report.stdout
    resent, refused = simulate(federation, "budget-2", merchants, "budget", 1.0, **{"num-server-rounds": 2})
    # round 1 on the same initial adapter: each merchant re-sends the update it already released (free)
    assert len(resent["accepted"]) == 3
    # round 2 needs new training, which the spent budget cannot pay for
    assert refused["accepted"] == [] and len(refused["failed"]) == 3
    assert all("privacy budget exhausted" in f["reason"] for f in refused["failed"])
    for i in range(3):
        ledger = json.loads((federation / "budget" / f"merchant-{i}" / "privacy.json").read_text())
        assert len(ledger["history"]) == 1  # nothing was spent by the second run


def test_a_merchant_over_the_policys_budget_refuses_to_train_and_says_why(tmp_path: Path) -> None:
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data": str(tmp_path / "never-read.csv"), "state-dir": str(tmp_path), "epsilon": 8.0},
        state=RecordDict(),
        run_config={},
    )
    policy = {"require-dp": True, "max-epsilon": 4.0, "max-delta": 0.0, "dp": True}
    config = ConfigRecord({"server-round": 1, "round-offset": 0, "backbone-hash": "0" * 64, **policy})
    instruction = Metadata(1, "m", 0, 7, "", "", 0.0, 60.0, MessageType.TRAIN)
    msg = Message(metadata=instruction, content=RecordDict({"config": config, "arrays": ArrayRecord()}))  # type: ignore[call-overload]
    reply = merchant_app.answering(merchant_app.train)(msg, context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED
    assert reply.error.reason == FAILURES[POLICY_REFUSED]  # the fixed words, all that leaves the merchant
    with pytest.raises(
        PolicyRefused, match="ε=8 is above the federation's maximum ε=4: join with --epsilon 4"
    ):
        train_round(Merchant.from_node(context), config, ArrayRecord(), 1)
    assert not (tmp_path / "privacy.json").exists()  # refused before anything was spent or read


@pytest.mark.parametrize("handler", [merchant_app.train, merchant_app.evaluate])
def test_a_failing_merchant_sends_a_fixed_code_and_keeps_its_data_to_itself(
    tmp_path: Path, handler: Any
) -> None:
    """The failure reply of a merchant whose export is unusable carries neither its rows nor its path."""
    secret = tmp_path / "alice@example.com-4111111111111111"
    secret.mkdir()
    export = secret / "events.csv"
    export.write_text(
        "user_id,timestamp,event_type,item_id\nalice@example.com,yesterday,view,4111111111111111\n"
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data": str(export), "state-dir": str(tmp_path / "state"), "epsilon": 8.0},
        state=RecordDict(),
        run_config={},
    )
    config = ConfigRecord({"server-round": 1, "round-offset": 0, "backbone-hash": "0" * 64})
    instruction = Metadata(1, "m", 0, 7, "", "", 0.0, 60.0, MessageType.TRAIN)
    content = RecordDict({"config": config, "arrays": ArrayRecord()})
    msg = Message(metadata=instruction, content=content)  # type: ignore[call-overload]
    reply = merchant_app.answering(handler)(msg, context)
    assert reply.has_error() and reply.error.code == MERCHANT_SETUP
    assert reply.error.reason == FAILURES[MERCHANT_SETUP]
