"""Federation benchmarks: what one merchant sends per round, and a round's wall time.

    python benchmarks/federation.py [--out bench-out]
    python benchmarks/federation.py --scale 10,50,100 [--out bench-out]

1. Bytes a merchant sends per round (the serialised ArrayRecord of its adapter update, as Flower ships
   it) against the full backbone's weights: FFA-LoRA (B only) and plain LoRA (A and B), at every linear
   layer and at q/v only, rank 8 and 4, at the default model size and a larger one.
2. Wall time of a round with 3 merchants, in the same run: on Flower's Simulation Engine (Ray), and as
   real processes on loopback (`fedanom server`, 3 x `fedanom client`: SuperLink, SuperNodes, a fresh
   ClientApp process per message; `--threads 1` per merchant, since all share this machine's 2 cores).
   The real run is split into the merchants' own training time, the
   rest of the training round trip (messages, ClientApp start-up, reading data), aggregation, and
   federated evaluation, from the timings `rounds.jsonl` records.
3. A message's cold start: seconds from a fresh process's start to its first training step (the reply's
   time less the merchant's own training), for one merchant of 20,000 and of 1,000,000 events: in the
   fresh process with its data not yet prepared, then prepared (`common.prepared`), then handed to the
   merchant's warm worker (`client.worker`); and a whole evaluate message, in the process and in the
   worker. `one_message.py` answers each message in its own process, as Flower's `flwr-clientapp` would.
4. `--scale`: rounds per hour on the Simulation Engine with 10, 50, 100 virtual merchants of 2,000
   events each (the default model, 2 rounds), and memory: the peak resident memory of the whole
   process tree (driver, Ray, its workers) and of the largest Ray worker, sampled every 0.2 s, plus the
   state each virtual merchant keeps on disk. The 3-merchant round of (2) is its baseline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
from detector import ADAPTERS  # the adapter choices, whose quality detector.py --lora-sweep measures
from flwr.simulation import run_simulation

from fedanom.client.app import make_client_app
from fedanom.client.merchant import VirtualMerchants
from fedanom.client.supernode import warm_worker
from fedanom.common.backbone import backbone_hash
from fedanom.common.detector.artifact import load_backbone, save_backbone
from fedanom.common.detector.model import attach_lora, build_backbone, trainable_state
from fedanom.common.flower import free_port
from fedanom.common.records import to_record
from fedanom.common.settings import EPSILON, RUN_DEFAULTS, BackboneConfig, LoraSettings
from fedanom.server.app import FORWARDED, build_app
from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def traffic() -> dict[str, dict[str, float]]:
    out = {}
    for label, config in (
        ("default d=64 x2", BackboneConfig()),
        ("d=256 x4", BackboneConfig(d_model=256, n_layers=4)),
    ):
        backbone_bytes = sum(p.numel() * p.element_size() for p in build_backbone(config).parameters())
        for name, settings in ADAPTERS.items():
            update = trainable_state(attach_lora(build_backbone(config), settings))
            sent = to_record(update).count_bytes()
            out[f"{label}, {name}"] = {
                "update_bytes": sent,
                "backbone_bytes": backbone_bytes,
                "share_of_backbone": sent / backbone_bytes,
            }
    return out


def merchants(workdir: Path, n: int = 3, events: int = 20_000, name: str = "m") -> list[str]:
    """The backbone in workdir/base and n merchants of `events` events each."""
    if not (workdir / "base").exists():
        save_backbone(build_backbone(BackboneConfig()), workdir / "base", {"benchmark": True})
    files = []
    for i in range(n):
        config = ShopConfig(n_events=events, n_users=events // 10, n_items=events // 4)
        shop = generate_shop(config, seed=70 + i)
        files.append(
            str(write_taobao_csv(inject(shop, {"scraping-crude": 5}, seed=i), workdir / f"{name}{i}.csv"))
        )
    return files


def simulated_round_time(workdir: Path, rounds: int, n: int = 3, events: int = 20_000) -> dict[str, float]:
    files = merchants(workdir, n, events)
    overrides: dict[str, bool | float | int | str] = {
        "num-server-rounds": rounds,
        "min-nodes": n,
        "base": str(workdir / "base"),
        "run-dir": str(workdir / "sim-run"),
        "round-timeout": 7200.0,
    }
    memory = MemorySampler()
    started = time.perf_counter()
    with memory:
        run_simulation(
            server_app=build_app(overrides),
            client_app=make_client_app(
                merchants=VirtualMerchants(
                    tuple(Path(f) for f in files), workdir / "sim-state", workdir / "base", EPSILON
                )
            ),
            num_supernodes=n,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2},
            },
        )
    total = time.perf_counter() - started
    state = sum(f.stat().st_size for f in (workdir / "sim-state").rglob("*") if f.is_file())
    split = round_split(workdir / "sim-run")
    return {
        "merchants": n,
        "total_seconds": total,
        "rounds_per_hour": 3600 / split["seconds_between_round_ends"],
        **split,
        **memory.peaks(),
        "state_bytes_per_merchant": state / n,
    }


class MemorySampler:
    """Peak resident memory of this process and all its descendants (Ray's workers included), and of
    the largest ClientApp actor (a Ray worker that runs virtual merchants one after another)."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.total, self.worker = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every_s):
            sizes = {}
            for process in [me, *me.children(recursive=True)]:
                try:
                    sizes[process.pid] = (process.memory_info().rss, " ".join(process.cmdline()))
                except psutil.Error:
                    continue
            self.total = max(self.total, sum(rss for rss, _ in sizes.values()))
            workers = [rss for rss, command in sizes.values() if command.startswith("ray::ClientAppActor")]
            self.worker = max([self.worker, *workers])

    def peaks(self) -> dict[str, float]:
        return {"peak_rss_total_mib": self.total / 2**20, "peak_rss_one_worker_mib": self.worker / 2**20}


def deployed_round_time(workdir: Path, rounds: int) -> dict[str, float]:
    files = merchants(workdir)
    address = f"127.0.0.1:{free_port()}"
    fedanom = [sys.executable, "-m", "fedanom"]
    started = time.perf_counter()
    with open(workdir / "deployed.log", "ab") as log:

        def launch(*args: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [*fedanom, *args], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        server = launch(
            *["server", "--base", "base", "--rounds", str(rounds), "--min-clients", "3"],
            *["--expect-clients", "3", "--run-dir", "run", "--address", address],
        )
        clients = [
            launch(
                *["client", "--server", address, "--data", name, "-p", "taobao", "--base", "base"],
                *["--state-dir", f"state-{i}", "--port", str(free_port()), "--threads", "1"],
            )
            for i, name in enumerate(files)
        ]
        try:
            if server.wait(timeout=1800) != 0:
                raise RuntimeError(f"the deployed run failed; see {workdir / 'deployed.log'}")
        finally:
            for process in [server, *clients]:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
    return {"total_seconds": time.perf_counter() - started, **round_split(workdir / "run")}


def message_overhead(workdir: Path, events: int) -> dict[str, float]:
    """Seconds from a fresh ClientApp process's start to a train message's first step (its reply's time
    less the merchant's own training), and a whole evaluate message, answered in the fresh process
    (before and after the data is prepared) and by the merchant's warm worker."""
    files = merchants(workdir, n=1, events=events, name=f"overhead-{events}")
    base, state = workdir / "base", workdir / f"overhead-state-{events}"
    adapter = workdir / "adapter.npz"
    initial = trainable_state(attach_lora(load_backbone(base), LoraSettings()))
    np.savez(adapter, **{name: t.numpy() for name, t in initial.items()})  # type: ignore[arg-type]
    config = {key: RUN_DEFAULTS[key] for key in FORWARDED}
    # a few steps suffice: what is measured is everything but them
    config.update({"local-epochs": 0.02, "round-offset": 0, "backbone-hash": backbone_hash(base)})
    config["num-server-rounds"] = 5
    node = {
        "data": files[0],
        "preset": "taobao",
        "state-dir": str(state),
        "epsilon": EPSILON,
        "base": str(base),
    }
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def answer(kind: str, server_round: int) -> float:
        spec = workdir / "message.json"
        spec.write_text(json.dumps({"node": node, "config": {**config, "server-round": server_round}}))
        started = time.time()
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("one_message.py")), kind, str(spec), str(adapter)],
            capture_output=True,
            text=True,
            env=environment,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        reply = json.loads(done.stdout.splitlines()[-1])
        return float(reply["ready"] - started - reply.get("train-seconds", 0.0))

    results = {
        "train_cold_unprepared": answer("train", 1),
        "train_cold_prepared": answer("train", 2),
        "evaluate_cold_whole": answer("evaluate", 2),
    }
    with open(workdir / "worker.log", "w") as log, warm_worker(state, environment, log):
        results["train_warm_worker"] = answer("train", 3)
        results["evaluate_warm_worker_whole"] = answer("evaluate", 3)
    return {"events": events, **results}


def round_split(run_dir: Path) -> dict[str, float]:
    """Mean seconds per round: between round ends, the training round trip, the slowest merchant's own
    training, aggregation and the evaluation round trip (rounds after the first: no start-up)."""
    log = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    later = log[1:] or log
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(log)]
    training = [max(c["train-seconds"] for c in r["clients"].values()) for r in later]
    return {
        "rounds": len(log),
        "seconds_between_round_ends": statistics.mean(gaps) if gaps else float("nan"),
        "train_round_trip": statistics.mean(r["seconds"]["train_round_trip"] for r in later),
        "slowest_merchant_training": statistics.mean(training),
        "aggregation": statistics.mean(r["seconds"]["aggregation"] for r in later),
        "evaluate_round_trip": statistics.mean(r["seconds"]["evaluate_round_trip"] for r in later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--overhead-events", type=lambda v: [int(n) for n in v.split(",")], default=[20_000, 1_000_000]
    )
    parser.add_argument("--scale", help="comma-separated merchant counts: rounds/hour and memory only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        runs = []
        for n in [3, *map(int, args.scale.split(","))]:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(simulated_round_time(Path(tmp), 2, n, 2_000))
            print(json.dumps(runs[-1], indent=1), flush=True)
        (args.out / "scale.json").write_text(json.dumps(runs, indent=2))
        return
    results: dict[str, object] = {"traffic": traffic()}
    print(json.dumps(results["traffic"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["message_overhead"] = [message_overhead(Path(tmp), n) for n in args.overhead_events]
        print(json.dumps(results["message_overhead"], indent=1), flush=True)
        results["simulated_round"] = simulated_round_time(Path(tmp), args.rounds)
        print(json.dumps(results["simulated_round"], indent=1), flush=True)
        results["deployed_round"] = deployed_round_time(Path(tmp), args.rounds)
        print(json.dumps(results["deployed_round"], indent=1), flush=True)
    (args.out / "federation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
