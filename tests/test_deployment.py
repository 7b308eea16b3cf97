"""`fedanom server` and `fedanom client` as real processes on loopback: a Flower SuperLink, four
SuperNodes, `flwr run`. Three merchants hold real samples from ../shared/data with injected bots; one
of them has no backbone and is sent it. The fourth merchant is killed while it trains round 1, and the
round completes with the others. The server is killed after round 1 and restarted with --resume; the
clients reconnect by themselves and the run finishes round 2 with no completed round lost. Over TLS,
only SuperNodes whose keys the operator registered may join."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pandas as pd
import psutil
import pytest
import typer
import yaml
from flwr.common.constant import SUPERLINK_NODE_ID
from sklearn.metrics import roc_auc_score

from fedanom import cli as fedanom_cli
from fedanom.common.backbone import backbone_hash
from fedanom.common.detector.artifact import save_backbone
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.model import build_backbone
from fedanom.common.flower import flower_environment, free_port
from fedanom.common.ingest import ingest
from fedanom.common.labels import read_labels
from fedanom.common.presets import resolve_preset
from fedanom.common.records import FAILURES, POLICY_REFUSED
from fedanom.common.settings import BackboneConfig
from fedanom.common.windows import Windows
from fedanom.simulations.attacks import inject
from fedanom.simulations.real import real_shop
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


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


# Three merchants with real traffic from ../shared/data, each with labelled bot sessions injected, and
# a fourth (synthetic) whose SuperNode is killed while it runs round 1's training.
REAL_MERCHANTS = [
    ("diginetica", "diginetica-sample/sample_train-item-views.csv.gz"),
    ("rees46", "rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz"),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.tsv.gz"),
]
BOTS = {"scraping-crude": 12, "click-fraud-crude": 12}
AUROC_FLOOR = 0.85  # every merchant's final global detector, on its own sessions with their injected bots
VICTIM = 3
OVER_BUDGET = 4  # joins with ε=8 a federation whose policy allows at most ε=4


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, tiny_backbone: Path) -> Path:
    root = tmp_path_factory.mktemp("deployment")
    shutil.copytree(tiny_backbone, root / "base")
    for i, (preset, name) in enumerate(REAL_MERCHANTS):
        events = inject(real_shop(shared_data / name, preset), BOTS, seed=i)
        write_taobao_csv(events, root / f"m{i}.csv")
        bots = events[events.attack != ""].user_id.unique()
        pd.DataFrame({"user_id": bots, "label": 1}).to_csv(root / f"labels-{i}.csv", index=False)
    victim = generate_shop(ShopConfig(n_events=4_000, n_users=400, n_items=500), seed=93)
    write_taobao_csv(victim, root / f"m{VICTIM}.csv")
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
        "240",
        *["--require-dp", "--max-epsilon", "4"],
    ]
    server = start(*server_args, "--expect-clients", "5", cwd=root, log=root / "server.log")
    clients = []
    for i in range(5):
        own = ["--base", "base"] if i > 0 else []  # merchant 0 has no backbone: the server ships it
        labelled = ["--labels", f"labels-{i}.csv"] if i < len(REAL_MERCHANTS) else []
        data = f"m{i if i != OVER_BUDGET else 1}.csv"
        command = ["client", "--server", address, "--data", data, "-p", "taobao", *own, *labelled]
        command += ["--state-dir", f"state-{i}", "--port", str(free_port()), "--threads", "1"]
        command += ["--epsilon", "8" if i == OVER_BUDGET else "4"]
        clients.append(start(*command, cwd=root, log=root / f"client-{i}.log"))
    try:
        # killed as soon as it has taken round 1's training message: the SuperLink notices the silence
        # after two missed 30 s heartbeats (Flower's fixed interval) while the others train
        victim_log = root / f"state-{VICTIM}" / "supernode.log"  # Flower's lines, kept out of the console
        wait_for(
            lambda: victim_log.exists() and "Receiving: train message" in victim_log.read_text(),
            300,
            "the victim's round 1",
        )
        kill(clients[VICTIM])
        assert not (root / f"state-{VICTIM}" / "replies").exists()
        wait_for(lambda: (root / "run" / "round-1" / "adapter.npz").exists(), 300, "round 1")
        env = flower_environment(FLWR_HOME=str(root / "run" / "flwr-home"))
        listing = subprocess.run(["flwr", "ls", "--format", "json"], env=env, capture_output=True, text=True)
        (root / "flwr-ls.json").write_text(listing.stdout)
        run_id = str(json.loads(listing.stdout)["runs"][0]["run-id"])
        for _ in range(6):  # a loaded machine's SuperLink can miss a Control API call: ask again
            shown = subprocess.run(["flwr", "log", run_id, "--show"], env=env, capture_output=True, text=True)
            if "unavailable" not in shown.stdout + shown.stderr:
                break
            time.sleep(10)
        (root / "flwr-log.txt").write_text(shown.stdout + shown.stderr)
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
    assert [r["round"] for r in log] == [1, 2]
    for r in log:
        assert len(r["accepted"]) == 3 and r["rejected"] == [] and r["backbone_failed"] == []
        assert (deployment / "run" / f"round-{r['round']}" / "adapter.npz").exists()
    assert (deployment / "run" / "global" / "adapter" / "adapter_model.safetensors").exists()
    console = (deployment / "server.log").read_text()
    assert "federation finished: 2 rounds" in console
    # each run's console names the rounds it completed: round 1 with the victim's failure, then the
    # resumed run's round 2 (the first run's round-2 work, cut short by the kill, is not reported)
    progress = [line for line in console.splitlines() if line.startswith("round ")]
    assert progress[0].startswith("round 1 of 2: 3 updates accepted, 0 rejected, 2 merchants failed (")
    assert progress[1:] == [progress[-1]] and progress[-1].startswith("round 2 of 2: 3 updates accepted")


def test_a_merchant_over_the_operators_privacy_terms_refuses_and_the_others_train(deployment: Path) -> None:
    log = [json.loads(line) for line in (deployment / "run" / "rounds.jsonl").read_text().splitlines()]
    for r in log:
        assert r["policy"] == {
            "require_dp": True,
            "max_epsilon": 4.0,
            "max_delta": 0.0,
            "privacy_unit": "user",
        }
        assert all(0 < c["epsilon"] <= c["epsilon-budget"] == 4.0 for c in r["clients"].values())
    # round 1 waited for all five merchants (the resumed round 2 starts with the first three back)
    assert (
        FAILURES[POLICY_REFUSED] in [f["reason"] for f in log[0]["failed"]] and len(log[0]["accepted"]) == 3
    )
    own_log = (deployment / f"state-{OVER_BUDGET}" / "supernode.log").read_text()
    assert "ε=8 is above the federation's maximum ε=4: join with --epsilon 4 or less" in own_log
    assert not (deployment / f"state-{OVER_BUDGET}" / "privacy.json").exists()  # nothing spent


def test_a_merchants_console_keeps_fedanoms_lines_and_flowers_go_to_its_log(deployment: Path) -> None:
    for i in range(4):
        console = (deployment / f"client-{i}.log").read_text()
        assert "joining the federation" in console and "Receiving" not in console, console[-2000:]
        assert "Receiving: train message" in (deployment / f"state-{i}" / "supernode.log").read_text()


def test_each_merchants_rounds_ran_in_its_warm_worker_on_data_prepared_once(deployment: Path) -> None:
    """Flower's fresh ClientApp process per message handed the model work to the merchant's worker, which
    read the windows `fedanom client` had prepared before joining (one cache entry, never rebuilt)."""
    for i in range(len(REAL_MERCHANTS)):
        (prepared,) = (deployment / f"state-{i}" / "prepared").glob("*.npz")
        joined = (deployment / f"state-{i}" / "node-config.toml").stat().st_mtime_ns
        assert prepared.stat().st_mtime_ns <= joined  # written before the SuperNode started, not since
        log = (deployment / f"state-{i}" / "supernode.log").read_text()
        assert "fedanom worker: answered the train message" in log, log[-2000:]
        assert "fedanom worker: answered the evaluate message" in log
        assert "working in this process" not in log


def test_a_merchant_killed_mid_round_leaves_the_round_to_the_others(deployment: Path) -> None:
    first = json.loads((deployment / "run" / "round-1" / "metrics.json").read_text())
    (failed,) = [f for f in first["failed"] if f["reason"] != FAILURES[POLICY_REFUSED]]
    assert str(failed["node"]) not in first["clients"] and len(first["clients"]) == 3
    assert failed["node"] != SUPERLINK_NODE_ID  # the merchant's own id, not the SuperLink's that answered
    assert failed["reason"]


def test_the_backbone_is_shipped_to_the_merchant_that_lacks_it(deployment: Path) -> None:
    shipped = list((deployment / "state-0" / "backbones").iterdir())
    assert [p.name for p in shipped] == [backbone_hash(deployment / "base")]
    assert backbone_hash(shipped[0]) == shipped[0].name
    for i in (1, 2):
        assert not (deployment / f"state-{i}" / "backbones").exists()


def test_every_merchant_ranks_its_injected_bots_above_its_normal_sessions(deployment: Path) -> None:
    for i, (preset, _) in enumerate(REAL_MERCHANTS):
        ledger = json.loads((deployment / f"state-{i}" / "privacy.json").read_text())
        # round 2 was trained once: the resumed server got the stored update again, at no privacy cost
        sample_rate = ledger["history"][0][1]
        assert sum(steps for _, _, steps in ledger["history"]) == 2 * round(1 / sample_rate)
        detector = BehaviourDetector.load(deployment / f"state-{i}" / "detector")
        assert detector.provenance["federated_round"] == 2
        assert 0 < detector.provenance["epsilon"] <= 4.0
        ingested = ingest(deployment / f"m{i}.csv", resolve_preset("taobao"), popularity=detector.popularity)
        windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
        known = read_labels(deployment / f"labels-{i}.csv", windows)
        auroc = roc_auc_score(known, detector.decision_function(windows))
        assert auroc >= AUROC_FLOOR, f"{preset}: AUROC {auroc:.3f}"


def test_rounds_log_federated_evaluation_with_labelled_merchants_auroc(deployment: Path) -> None:
    last = json.loads((deployment / "run" / "round-2" / "metrics.json").read_text())
    clients = last["evaluate"]["clients"]
    # the labelled three, and the merchant the privacy policy refused training if it was back in time
    # (evaluating spends no privacy: it still gets the global detector)
    assert len(clients) in (3, 4) and all(c["num-examples"] > 0 for c in clients.values())
    aurocs = [c["val-auroc"] for c in clients.values() if "val-auroc" in c]
    assert len(aurocs) == len(REAL_MERCHANTS)
    assert min(aurocs) <= last["evaluate"]["combined"]["val-auroc"] <= max(aurocs)  # a weighted mean


def test_the_operator_sees_the_run_with_flwr_ls_and_flwr_log(deployment: Path) -> None:
    runs = json.loads((deployment / "flwr-ls.json").read_text())["runs"]
    assert len(runs) == 1 and "running" in runs[0]["status"].lower()
    assert "ROUND 1" in (deployment / "flwr-log.txt").read_text()


def test_a_server_and_a_client_told_to_stop_leave_no_flower_process_behind(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    """SIGTERM to `fedanom server` and `fedanom client` alone (as `kill` or a service manager sends it)
    stops the SuperLink with the `flower-superexec` / `flwr-serverapp` it started in a session of their
    own, and the SuperNode with everything it started."""
    shutil.copytree(tiny_backbone, tmp_path / "base")
    write_taobao_csv(
        generate_shop(ShopConfig(n_events=400, n_users=40, n_items=100), seed=5), tmp_path / "m.csv"
    )
    address = f"127.0.0.1:{free_port()}"
    server = start(
        *["server", "--base", "base", "--run-dir", "run", "--address", address],
        cwd=tmp_path,
        log=tmp_path / "s.log",
    )
    client = start(
        *["client", "--server", address, "--data", "m.csv", "-p", "taobao", "--port", str(free_port())],
        cwd=tmp_path,
        log=tmp_path / "c.log",
    )
    seen: set[psutil.Process] = set()  # every process either has started, in any snapshot

    def running(process: subprocess.Popen[bytes], name: str) -> bool:
        found = False
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                seen.add(child)
                with contextlib.suppress(psutil.Error):
                    found = found or name in " ".join(child.cmdline())
        return found

    try:
        wait_for(lambda: running(server, "flwr-serverapp"), 120, "the ServerApp process")
        wait_for(lambda: running(client, "flower-supernode"), 120, "the SuperNode process")
        for process in (server, client):
            os.kill(process.pid, signal.SIGTERM)
            assert process.wait(timeout=120) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(list(seen), timeout=5)
        assert alive == [], [p.pid for p in alive]
    finally:
        kill(server)
        kill(client)


def test_plain_text_outside_loopback_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fedanom", "client", "--server", "203.0.113.5:8000", "--data", "x.csv"]
    command += ["--base", "b"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "x.csv does not exist" in result.stderr  # the data is checked first
    (tmp_path / "x.csv").write_text(
        "user_id,timestamp,event_type,item_id\nu,1700000000,view,i\nu,1700000001,view,j\n"
    )
    save_backbone(
        build_backbone(BackboneConfig(d_model=16, n_layers=1, n_heads=2)), tmp_path / "b", {"test": True}
    )
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert (
        result.returncode == 1
        and "not a loopback address" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_over_tls_only_registered_supernodes_join(tmp_path: Path) -> None:
    """Certificates and node keys from deploy/generate-certificates.sh; the operator registers node 1's
    public key only. Node 2 keeps knocking and is refused every time, so the round runs with node 1 alone."""
    script = Path(__file__).resolve().parent.parent / "deploy" / "generate-certificates.sh"
    subprocess.run(
        ["bash", str(script), str(tmp_path / "certs"), "--nodes", "2"], check=True, capture_output=True
    )
    save_backbone(
        build_backbone(BackboneConfig(d_model=16, n_layers=1, n_heads=2)), tmp_path / "base", {"test": True}
    )
    shop = generate_shop(ShopConfig(n_events=1_500, n_users=200, n_items=500), seed=99)
    write_taobao_csv(shop, tmp_path / "m.csv")
    address = f"127.0.0.1:{free_port()}"
    server = start(
        *["server", "--base", "base", "--rounds", "1", "--min-clients", "1", "--run-dir", "run"],
        *["--address", address, "--certificates", "certs", "--node-key", "certs/node-1.pub"],
        *["--round-timeout", "120"],
        cwd=tmp_path,
        log=tmp_path / "server.log",
    )
    clients = [
        start(
            *["client", "--server", address, "--data", "m.csv", "-p", "taobao", "--state-dir", f"s{k}"],
            *["--root-certificates", "certs/ca.crt", "--auth-key", f"certs/node-{k}"],
            *["--port", str(free_port())],
            cwd=tmp_path,
            log=tmp_path / f"client-{k}.log",
        )
        for k in (1, 2)
    ]
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        refused = "has not admitted this node's key yet"
        wait_for(lambda: refused in (tmp_path / "client-2.log").read_text(), 60, "node 2's refusal")
    finally:
        kill(server)
        for client in clients:
            kill(client)
    link_log = (tmp_path / "run" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in link_log and "registered successfully" in link_log
    (round_one,) = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(round_one["accepted"]) == 1
    assert (tmp_path / "s1" / "detector").exists() and not (tmp_path / "s2" / "privacy.json").exists()


def test_the_compose_file_runs_valid_fedanom_commands_on_mounted_paths() -> None:
    """No container engine here, so the compose file is checked for what breaks it silently: every
    command parses with fedanom's own CLI, every path it names is mounted, and each merchant's node key
    is one the server admits."""
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    services = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]
    cli = typer.main.get_command(fedanom_cli.app)
    assert isinstance(cli, click.Group)
    params: dict[str, dict[str, Any]] = {}
    for name, service in services.items():
        command = [str(part) for part in service["command"]]
        subcommand = cli.get_command(click.Context(cli), command[0])
        assert subcommand is not None, f"{name}: no fedanom command '{command[0]}'"
        params[name] = subcommand.make_context(command[0], command[1:]).params
        mounts = [volume.split(":")[1] for volume in service["volumes"]]
        for part in command:
            if part.startswith("/"):
                assert any(part == m or part.startswith(m.rstrip("/") + "/") for m in mounts), (name, part)
    admitted = {Path(str(key)).name for key in params["superlink"]["node_keys"]}
    merchants = [name for name in services if name != "superlink"]
    assert len(merchants) == 2
    assert {Path(str(params[m]["auth_key"])).name + ".pub" for m in merchants} == admitted
