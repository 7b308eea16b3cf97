"""pretrain -> train -> score as a merchant and an operator run them: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def fedanom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedanom", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_taobao_csv(
        generate_shop(ShopConfig(n_events=8_000, n_users=800, n_items=2_000), seed=5), root / "public.csv"
    )
    shop = generate_shop(ShopConfig(n_events=6_000, n_users=600, n_items=1_500), seed=6)
    frame = inject(shop, {"scraping-crude": 4, "click-fraud-crude": 4}, seed=7)
    write_taobao_csv(frame, root / "merchant.csv")
    labels = frame[frame.attack != ""][["user_id"]].drop_duplicates().assign(label=1)
    labels.to_csv(root / "labels.csv", index=False)
    result = fedanom(
        "pretrain",
        "--data",
        "public.csv",
        "-p",
        "taobao",
        "--out",
        "base",
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--epochs",
        "1",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    assert "backbone written to base" in result.stdout
    return root


def test_train_then_score_with_explanations(workdir: Path) -> None:
    train = fedanom(
        "train",
        "--data",
        "merchant.csv",
        "-p",
        "taobao",
        "--base",
        "base",
        "--out",
        "det",
        "--labels",
        "labels.csv",
        "--state-dir",
        "state-a",
        "--epochs",
        "1",
        cwd=workdir,
    )
    assert train.returncode == 0, train.stderr
    assert "ε=" in train.stdout and "of 8 spent" in train.stdout
    assert "score sums sequence + features" in train.stdout  # the kinds the detector's score adds up
    spec = json.loads((workdir / "det" / "detector.json").read_text())
    assert spec["provenance"]["epsilon"] <= 8.0
    assert spec["backbone"]["path"] == "../base"

    score = fedanom(
        "score",
        "--data",
        "merchant.csv",
        "-p",
        "taobao",
        "--model",
        "det",
        "--out",
        "s.csv",
        "--explain",
        cwd=workdir,
    )
    assert score.returncode == 0, score.stderr
    scores = pd.read_csv(workdir / "s.csv")
    assert list(scores.columns) == [
        "session_id",
        "user_id",
        "start",
        "events",
        "score",
        "rank",
        "explanation",
        "flag",
    ]
    assert scores["rank"].tolist() == list(range(1, len(scores) + 1))
    assert scores.score.is_monotonic_decreasing
    assert scores.session_id.is_unique
    assert scores.events.sum() == len(
        pd.read_csv(workdir / "merchant.csv", header=None)
    )  # every event scored
    assert 0 < scores.flag.sum() < 0.1 * len(scores)
    # each part of an explanation is the model's odds of an event or of the context, or a session
    # feature placed among this shop's sessions
    parts = scores.explanation.str.split(" [|] ").explode()
    assert parts.str.contains("under this shop's model|of this shop's sessions").all()
    assert parts.str.contains("under this shop's model").any() and parts.str.contains("line ").any()

    parquet = fedanom(
        "score", "--data", "merchant.csv", "-p", "taobao", "--model", "det", "--out", "s.parquet", cwd=workdir
    )
    assert parquet.returncode == 0, parquet.stderr
    assert len(pd.read_parquet(workdir / "s.parquet")) == len(scores)

    # a library user scores a DataFrame of the same events in three lines, and gets the same table
    from fedanom.common.detector import BehaviourDetector, score_events

    events = pd.read_csv(
        workdir / "merchant.csv", names=["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
    )
    table = score_events(BehaviourDetector.load(workdir / "det"), events, preset="taobao")
    written = pd.read_parquet(workdir / "s.parquet")
    assert table.session_id.tolist() == written.session_id.tolist()
    assert np.allclose(table.score, written.score) and (table.flag == written.flag).all()


def test_privacy_budget_accumulates_and_is_refused_when_spent(workdir: Path) -> None:
    args = [
        "train",
        "--data",
        "merchant.csv",
        "-p",
        "taobao",
        "--base",
        "base",
        "--out",
        "det-b",
        "--state-dir",
        "state-b",
    ]
    first = fedanom(*args, "--epsilon", "0.5", "--epochs", "1", cwd=workdir)
    assert first.returncode == 0, first.stderr
    ledger = json.loads((workdir / "state-b" / "privacy.json").read_text())
    assert len(ledger["history"]) == 1
    refused = fedanom(*args, "--epsilon", "0.5", "--epochs", "20", cwd=workdir)
    assert refused.returncode == 1
    assert "privacy budget exhausted" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((workdir / "state-b" / "privacy.json").read_text()) == ledger  # nothing spent


def test_user_mistakes_are_one_line(workdir: Path) -> None:
    data = ("--data", "merchant.csv", "-p", "taobao")
    train = ("train", *data, "--base", "base", "--out", "x")
    cases = [
        ("score", *data, "--model", "det", "--out", "s.txt"),
        ("score", *data, "--model", "nowhere", "--out", "s.csv"),
        ("train", *data, "--base", "nowhere", "--out", "x"),
        (*train, "--labels", "merchant.csv"),
        (*train, "--lora-targets", "nope"),
    ]
    for args in cases:
        result = fedanom(*args, cwd=workdir)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
