"""The `fedanom` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedanom.common.detector.model import ARCHITECTURES
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def fedanom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedanom", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def shop_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = generate_shop(ShopConfig(n_events=5_000, n_users=400, n_items=800), seed=3)
    return write_taobao_csv(frame, tmp_path_factory.mktemp("shop") / "events.csv")


def test_data_check_json(shop_csv: Path, tmp_path: Path) -> None:
    result = fedanom("data", "check", str(shop_csv), "--preset", "taobao", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_in"] == summary["rows_kept"] == 5_000
    assert summary["rows_conserved"] is True
    assert 0 < summary["users"] <= 400
    assert summary["sessions"] > 500
    assert set(summary["event_mix"]) == {"view", "fav", "cart", "purchase"}
    assert summary["session_events"]["p50"] <= summary["session_events"]["max"]


def test_data_check_table_and_quarantine(shop_csv: Path, tmp_path: Path) -> None:
    dirty = tmp_path / "dirty.csv"
    dirty.write_text(shop_csv.read_text() + "1,2,3,warp,1700000000\n")
    result = fedanom("data", "check", str(dirty), "--preset", "taobao", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "unknown event type" in result.stdout
    quarantine = tmp_path / "dirty.csv.quarantine.csv"
    assert quarantine.read_text().splitlines()[1].startswith("5001,unknown event type,behavior_type,warp,")
    # the export fixed (and one event doubled): the earlier quarantine goes, the duplicate is counted
    lines = shop_csv.read_text().splitlines(keepends=True)
    dirty.write_text("".join(lines) + lines[-1])
    again = fedanom("data", "check", str(dirty), "--preset", "taobao", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["rows_quarantined"] == 0 and summary["quarantine_file"] is None
    assert not quarantine.exists()
    assert summary["duplicate_events"] == 1 and summary["rows_kept"] == len(lines) + 1


def test_user_mistakes_give_one_line_and_no_traceback(shop_csv: Path, tmp_path: Path) -> None:
    shop = str(shop_csv)
    cases = [
        ("data", "check", str(tmp_path / "missing.csv")),
        ("data", "check", str(tmp_path), "--preset", "taobao"),
        ("data", "check", "x.csv", "--preset", "nosuch"),
        ("data", "check", "x.csv", "--map", "user=visitorid"),
        ("simulate", "--merchants", "1"),
        ("simulate", "--sizes", "12000,lots"),
        ("simulate", "--sizes", "12000,50"),
        ("simulate", "--sizes", "12000"),
        ("simulate", "--sizes", "2000,2000", "--unlabelled", "3"),
        ("simulate", "--data", "x.csv"),
        ("simulate", "--data", "missing.csv:taobao"),
        (
            "simulate",
            "--data",
            f"{shop}:taobao",
            "--data",
            f"{shop}:taobao",
            "--partition",
            "quantity:1",
        ),
    ]
    for args in cases:
        result = fedanom(*args, cwd=tmp_path)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_usage_mistakes_are_one_sentence_too(tmp_path: Path) -> None:
    """A missing or unknown option, a bad value or a mistyped command: one line naming the mistake and
    where the help is, exit code 2 (click's for usage), no box."""
    cases = [
        (("score", "--data", "x.csv"), "Missing option '--model'", "fedanom score --help"),
        (("train", "--bogus"), "no such option --bogus", "fedanom train --help"),
        (("simulate", "--rounds", "three"), "'three' is not a valid integer", "fedanom simulate --help"),
        (("scor",), "No such command 'scor'", "fedanom --help"),
    ]
    for args, mistake, help_hint in cases:
        result = fedanom(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert mistake in result.stderr and help_hint in result.stderr, result.stderr


def test_the_command_line_answers_without_loading_the_model_stack(tmp_path: Path) -> None:
    """`--help` and a user's mistake must not wait for torch, transformers, peft, Opacus and Flower to load
    (8 s here): the commands import them after their options are checked, and take their defaults from
    `common.settings`, which must then name every architecture the model can build."""
    heavy = ("torch", "transformers", "peft", "opacus", "flwr", "sklearn", "matplotlib")
    probe = (
        "import sys; from fedanom import cli; from fedanom.common.settings import ARCHITECTURE_NAMES; "
        f"print([m for m in {heavy} if m in sys.modules]); print(sorted(ARCHITECTURE_NAMES))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    loaded, names = result.stdout.splitlines()
    assert loaded == "[]"
    assert names == str(sorted(ARCHITECTURES))


def test_no_bare_top_level_packages_are_installed(tmp_path: Path) -> None:
    names = "('common', 'client', 'server', 'simulations')"
    probe = f"import importlib.util as u; print([n for n in {names} if u.find_spec(n)])"
    # what the installation provides, not what a simulation earlier in this process exported: Flower's Ray
    # backend sets PYTHONPATH to the driver's sys.path, the repository root among it
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=clean
    )
    assert result.stdout.strip() == "[]"
