"""`fedanom simulate` end to end on Flower's Simulation Engine: a small seeded run (3 merchants, 2 rounds,
a tiny model; the smallest merchant knows none of its attacks, as by default) writes its report, plots and
results, compares every method on every merchant, federated + DP clears a quality floor and costs the
smallest merchant little against training alone, and the federated anomaly head learned the known
attacks of the merchants that have labels, also for the one that has none. The partitioners keep users
whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.windows import Windows
from fedanom.simulations.attacks import ATTACKS
from fedanom.simulations.calibration import STATS
from fedanom.simulations.compare import METHODS
from fedanom.simulations.scenario import partition, prepare, synthetic_shops
from fedanom.simulations.shop import ShopConfig, generate_shop


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("simulation")
    command = [sys.executable, "-m", "fedanom", "simulate", "--out", str(out), "--merchants", "3"]
    command += ["--rounds", "2", "--scale", "0.25", "--d-model", "32", "--layers", "1", "--seed", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "simulation done" in result.stderr
    # the console keeps the progress and the outcome; Flower's lines go to each federation's log file
    assert "ROUND" not in result.stderr and result.stderr.count("\n") <= 5, result.stderr[-3000:]
    for method in ("federated-dp", "federated"):
        assert "[ROUND 2/2]" in (out / "work" / method / "flower.log").read_text()
    return out, json.loads((out / "results.json").read_text())


def test_the_report_plots_and_results_are_written(simulation: tuple[Path, dict[str, Any]]) -> None:
    out, results = simulation
    report = (out / "report.md").read_text()
    for name in ("pr_curves.png", "auprc_per_round.png", "epsilon_per_round.png", "attack_recall.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in report
    assert set(results["methods"]) == set(METHODS)
    assert all(method in report for method in METHODS)
    assert [r["round"] for r in results["rounds"]["federated-dp"]] == [1, 2]
    assert "## Normal traffic against the real samples" in report
    assert "ε = 8 per merchant (its unit: one shopper, all their sessions)" in report  # the default unit
    calibration = results["scenario"]["calibration"]
    assert list(calibration) == results["merchants"]
    assert all(set(stats) == set(STATS) for stats in calibration.values())


def test_every_method_is_measured_on_every_merchant(simulation: tuple[Path, dict[str, Any]]) -> None:
    _, results = simulation
    for values in results["methods"].values():
        assert len(values["per_merchant"]) == 3
        for m in values["per_merchant"]:
            assert m["sessions"] > m["attacks"] > 0
            assert set(m["per_attack_recall"]) <= set(ATTACKS) and m["per_attack_recall"]
    epsilons = [max(r["epsilon"].values()) for r in results["rounds"]["federated-dp"]]
    assert 0 < epsilons[0] < epsilons[1] <= 8.0
    assert all(max(r["epsilon"].values()) == 0.0 for r in results["rounds"]["federated"])


def test_federated_dp_reaches_the_quality_floor_on_every_merchant(
    simulation: tuple[Path, dict[str, Any]],
) -> None:
    """AUROC at least 0.85 and AUPRC at least three times the share of bots, on each merchant's test."""
    _, results = simulation
    for merchant in results["methods"]["federated-dp"]["per_merchant"]:
        assert merchant["auroc"] >= 0.85, merchant
        assert merchant["auprc"] >= 3 * merchant["attacks"] / merchant["sessions"], merchant


def test_the_smallest_merchant_loses_little_by_joining_the_federation(
    simulation: tuple[Path, dict[str, Any]],
) -> None:
    """The smallest merchant knows none of its attacks: alone it has only its own traffic's surprise; in the
    federation it scores with what the others trained under DP. Its test AUPRC, federated + DP minus
    local-only, on this scenario over seeds 0-5 before session 10: +0.165, +0.071, +0.045, +0.029,
    +0.195, -0.011 (benchmarks/smallest_merchant.py); seed 0 at session 10's code: -0.010, where the
    labelled merchants' validation, weighed alike, left the head out by 0.005 AUPRC. Which comes first
    depends on the seed, so the ordering is the benchmark's to measure; in every seed measured, joining
    cost it at most 0.011."""
    _, results = simulation
    merchants = results["scenario"]["merchants"]
    assert [m["labelled"] for m in merchants] == [True, True, False]
    smallest = min(range(len(merchants)), key=lambda i: merchants[i]["events"])
    auprc = {m: results["methods"][m]["per_merchant"][smallest]["auprc"] for m in METHODS}
    assert auprc["federated-dp"] >= auprc["local-only"] - 0.05, auprc


def test_the_federated_head_learned_the_merchants_known_attacks(
    simulation: tuple[Path, dict[str, Any]],
) -> None:
    """On each merchant's test sessions the global head's logit alone ranks its bots above its normal
    sessions (AUROC >= 0.85; the untrained head of the same seed scores 0.54-0.61 here), the smallest
    merchant's too, though it trained the head on no bot of its own."""
    out, results = simulation
    assert results["scenario"]["supervised_head"] is True
    work = out / "work"
    for i in range(3):
        detector = BehaviourDetector.load(work / "federated-dp" / "state" / f"merchant-{i}" / "detector")
        test = work / "merchants" / f"merchant-{i}-test.csv"
        ingested = ingest(test, resolve_preset("taobao"), popularity=detector.popularity)
        windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
        known = set(pd.read_csv(work / "federated-dp" / f"labels-{i}.csv", dtype=str).user_id)
        bots = np.array([user in known for user in windows.user])
        head = detector.surprise(windows).head
        assert head is not None and roc_auc_score(bots, head) >= 0.85, i


def test_the_smallest_merchants_are_the_ones_that_know_no_attacks(tmp_path: Path) -> None:
    shops = synthetic_shops([3_000, 2_000, 2_500, 2_000], seed=1)
    merchants = prepare(shops, tmp_path, seed=1, unlabelled=2)
    assert [m.labelled for m in merchants] == [True, False, True, False]
    assert all(m.bots for m in merchants)  # every merchant is attacked; only what it knows differs
    assert all(m.labelled for m in prepare(shops, tmp_path, seed=1))


@pytest.mark.parametrize("how", ["natural:category_id", "dirichlet:0.3", "quantity:1.0"])
def test_partitioners_split_a_shop_without_splitting_a_user(how: str) -> None:
    shop = generate_shop(ShopConfig(n_events=6_000, n_users=600, n_items=1_500), seed=3)
    parts = partition(shop, 3, how, seed=1)
    assert sum(len(p) for p in parts) == len(shop)
    owners = [set(p.user_id) for p in parts]
    assert all(owners[i].isdisjoint(owners[j]) for i in range(3) for j in range(i + 1, 3))
    assert all(len(p) > 0 for p in parts)
