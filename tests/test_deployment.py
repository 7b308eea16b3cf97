"""`fedanom server` and `fedanom client` as real processes on loopback: a Flower SuperLink, three
SuperNodes, `flwr run`. The server is killed after round 1 and restarted with --resume; the clients
reconnect by themselves and the run finishes round 2 with no completed round lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedanom.client.detector import BehaviourDetector
from fedanom.common.artifact import save_backbone
from fedanom.common.model import BackboneConfig
from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(*args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """A fedanom command in its own process group, so it can be killed with everything it started."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedanom", *args],
        cwd=cwd,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deployment")
    save_backbone(BackboneConfig(d_model=32, n_layers=1, n_heads=2).build(), root / "base", {"test": True})
    for i in range(3):
        shop = generate_shop(ShopConfig(n_events=2_500, n_users=300, n_items=900), seed=90 + i)
        write_taobao_csv(inject(shop, {"scraping-crude": 3}, seed=i), root / f"m{i}.csv")
    address = f"127.0.0.1:{free_port()}"
    server_args = [
        "server",
        "--base",
        "base",
        "--rounds",
        "2",
        "--min-clients",
        "3",
        "--run-dir",
        "run",
        "--address",
        address,
        "--round-timeout",
        "120",
    ]
    server = start(*server_args, cwd=root, log=root / "server.log")
    clients = [
        start(
            "client",
            "--server",
            address,
            "--data",
            f"m{i}.csv",
            "-p",
            "taobao",
            "--base",
            "base",
            "--state-dir",
            f"state-{i}",
            "--port",
            str(free_port()),
            cwd=root,
            log=root / f"client-{i}.log",
        )
        for i in range(3)
    ]
    try:
        wait_for(lambda: (root / "run" / "round-1" / "adapter.npz").exists(), 300, "round 1")
        kill(server)  # the operator's machine goes down after round 1
        restarted = start(*server_args, "--resume", cwd=root, log=root / "server.log")
        assert restarted.wait(timeout=400) == 0, (root / "server.log").read_text()[-3000:]
    finally:
        kill(server)
        for process in clients:
            kill(process)
    return root


def test_the_resumed_run_finishes_without_losing_a_round(deployment: Path) -> None:
    log = [json.loads(line) for line in (deployment / "run" / "rounds.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in log}) == [1, 2]
    for r in log:
        assert len(r["accepted"]) == 3 and r["rejected"] == []
    assert (deployment / "run" / "round-1" / "adapter.npz").exists()
    assert (deployment / "run" / "round-2" / "adapter.npz").exists()
    assert (deployment / "run" / "global" / "adapter" / "adapter_model.safetensors").exists()
    assert "federation finished: 2 rounds" in (deployment / "server.log").read_text()


def test_every_merchant_keeps_its_ledger_and_the_global_detector(deployment: Path) -> None:
    for i in range(3):
        ledger = json.loads((deployment / f"state-{i}" / "privacy.json").read_text())
        # round 2 was trained once: the resumed server got the stored update again, at no privacy cost
        sample_rate = ledger["history"][0][1]
        assert sum(steps for _, _, steps in ledger["history"]) == 2 * round(1 / sample_rate)
        detector = BehaviourDetector.load(deployment / f"state-{i}" / "detector")
        assert detector.provenance["federated_round"] == 2
        assert 0 < detector.provenance["epsilon"] <= 8.0


def test_plain_text_outside_loopback_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fedanom", "client", "--server", "203.0.113.5:8000", "--data", "x.csv"]
    command += ["--base", "b"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "x.csv does not exist" in result.stderr  # the data is checked first
    (tmp_path / "x.csv").write_text(
        "user_id,timestamp,event_type,item_id\nu,1700000000,view,i\nu,1700000001,view,j\n"
    )
    save_backbone(BackboneConfig(d_model=16, n_layers=1, n_heads=2).build(), tmp_path / "b", {"test": True})
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert (
        result.returncode == 1
        and "not a loopback address" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_a_federation_over_tls_with_generated_certificates(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "deploy" / "generate-certificates.sh"
    subprocess.run(
        ["bash", str(script), str(tmp_path / "certs"), "--nodes", "1"], check=True, capture_output=True
    )
    save_backbone(
        BackboneConfig(d_model=16, n_layers=1, n_heads=2).build(), tmp_path / "base", {"test": True}
    )
    shop = generate_shop(ShopConfig(n_events=1_500, n_users=200, n_items=500), seed=99)
    write_taobao_csv(shop, tmp_path / "m.csv")
    address = f"127.0.0.1:{free_port()}"
    server = start(
        "server",
        "--base",
        "base",
        "--rounds",
        "1",
        "--min-clients",
        "1",
        "--run-dir",
        "run",
        "--address",
        address,
        "--certificates",
        "certs",
        cwd=tmp_path,
        log=tmp_path / "server.log",
    )
    client = start(
        "client",
        "--server",
        address,
        "--data",
        "m.csv",
        "-p",
        "taobao",
        "--base",
        "base",
        "--root-certificates",
        "certs/ca.crt",
        "--port",
        str(free_port()),
        cwd=tmp_path,
        log=tmp_path / "client.log",
    )
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        kill(server)
        kill(client)
    assert "Uvicorn running on https://" in (tmp_path / "run" / "superlink.log").read_text()
    (round_one,) = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(round_one["accepted"]) == 1
