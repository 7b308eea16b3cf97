"""`fedanom serve` under load: latency per event, sustained events/s and memory per open session.

    python benchmarks/serve.py [--out bench-out] [--rates 100,1000,5000] [--seconds 10]

A detector at the default model size is trained (without DP: serving cost does not depend on how it was
trained) on the earlier 60% of the real REES46 sample in ../shared/data. The later 40% is then replayed
to a real `fedanom serve` process on loopback at its own pace, sped up to each offered rate; the sample
is replayed again with its users renamed and its clock moved on as often as a rate needs, so every rate
runs for `--seconds` with the sample's own mix of overlapping sessions. The load generator is open-loop
(events are sent when due, whether or not earlier answers came back): every 2 ms it sends the events
that came due as one NDJSON request, as a merchant's gateway would batch them.

Latency is per event, from the moment it was due to its answer, measured by the client (so it includes
waiting behind earlier requests when the service falls behind). Sustained events/s is answered events
over the phase's wall time. Memory per open session is what the service accounts for its open sessions
(their events and bookkeeping), and the service's resident memory growth over the phase per open
session. Batch `fedanom score` throughput on the same later events, in the same run, is the baseline
(`score_events`, the function the command runs).

The service gets one core (OMP_NUM_THREADS=1; it scores one request at a time) and the load generator
the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import psutil

from fedanom.common.detector.artifact import save_backbone
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.scores import score_events
from fedanom.common.flower import free_port
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import BackboneConfig, TrainSettings
from fedanom.common.windows import Windows
from fedanom.server.pretrain import pretrain_backbone

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46-multicategory"
TICK_S = 0.002


def detector_and_replay(workdir: Path) -> tuple[Path, pd.DataFrame]:
    """A detector trained on the sample's earlier 60%, and the later 40% as raw rows (its own columns)."""
    raw = pd.read_csv(next(SAMPLE.glob("*.csv.gz")), dtype=str, keep_default_na=False)
    raw = raw.iloc[np.argsort(pd.to_datetime(raw.event_time).to_numpy(), kind="stable")]
    cut = int(len(raw) * 0.6)
    raw.iloc[:cut].to_csv(workdir / "earlier.csv", index=False)
    ingested = ingest(workdir / "earlier.csv", resolve_preset("rees46"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    backbone, _ = pretrain_backbone(windows, BackboneConfig(), TrainSettings(dp=False, epochs=1))
    save_backbone(backbone, workdir / "base", {"benchmark": "serve"})
    detector = BehaviourDetector.from_backbone(workdir / "base", ingested.popularity, device="cpu")
    detector.fit(windows, train=TrainSettings(dp=False, epochs=1)).save(workdir / "detector")
    return workdir / "detector", raw.iloc[cut:].reset_index(drop=True)


def schedule(later: pd.DataFrame, rate: float, seconds: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """When each event is due (seconds from the phase's start) and the events: `rate` x `seconds` events
    at the sample's own pace, its clock sped up so that they take `seconds`."""
    ts = pd.to_datetime(later.event_time).astype("int64").to_numpy() / 1e9
    span = ts.max() - ts.min() + 1.0
    wanted = int(rate * seconds)
    offsets, events = [], list[dict[str, Any]]()
    for replay in range(int(np.ceil(wanted / len(later)))):
        copy = later.assign(
            user_id=later.user_id + f"-{rate:g}r{replay}",  # each phase and replay its own shoppers
            user_session=later.user_session + f"-{rate:g}r{replay}",
            event_time=pd.to_datetime(later.event_time)
            .add(pd.Timedelta(seconds=replay * span))
            .dt.strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
        offsets.append(ts - ts.min() + replay * span)
        events += [{str(k): v for k, v in row.items()} for row in copy.to_dict("records")]
    clock = np.concatenate(offsets)[:wanted]
    return clock / clock[-1] * seconds, events[:wanted]


async def offer(url: str, due: np.ndarray, events: list[dict[str, Any]]) -> dict[str, float]:
    """Send every event when it is due, answers or not; latency per event from due to answered."""
    latency = np.full(len(events), np.nan)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def send(first: int, last: int) -> None:
            body = "".join(json.dumps(e) + "\n" for e in events[first:last]).encode()
            answer = await client.post(
                "/events", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
            answer.raise_for_status()
            latency[first:last] = time.perf_counter() - start - due[first:last]

        start, tasks, i = time.perf_counter(), [], 0
        while i < len(events):
            now = time.perf_counter() - start
            j = int(np.searchsorted(due, now, side="right"))
            if j > i:
                tasks.append(asyncio.create_task(send(i, j)))
                i = j
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {
        "events": len(events),
        "offered_per_s": len(events) / float(due[-1]) if len(due) else 0.0,
        "sustained_per_s": len(events) / wall,
        "latency_p50_ms": float(np.percentile(latency, 50) * 1e3),
        "latency_p99_ms": float(np.percentile(latency, 99) * 1e3),
        "latency_p999_ms": float(np.percentile(latency, 99.9) * 1e3),
        "requests": len(tasks),
    }


def service_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {name: float(value) for name, value in re.findall(r"^(fedanom_serve_\w+) (\S+)$", text, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--rates", type=lambda v: [float(r) for r in v.split(",")], default=[100, 1000, 5000])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        detector_dir, later = detector_and_replay(workdir)
        later.to_csv(workdir / "later.csv", index=False)
        detector = BehaviourDetector.load(detector_dir, "cpu")
        started = time.perf_counter()
        scored = score_events(detector, workdir / "later.csv", preset="rees46")
        batch_s = time.perf_counter() - started
        results["batch"] = {"events": len(later), "sessions": len(scored), "per_s": len(later) / batch_s}
        print(json.dumps(results["batch"]), flush=True)
        port = free_port()
        command = [sys.executable, "-m", "fedanom", "serve", "-m", str(detector_dir), "-p", "rees46"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = open(workdir / "serve.log", "wb")  # noqa: SIM115  # closed with the service
        service = subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.5)
            phases = []
            for rate in args.rates:
                due, events = schedule(later, rate, args.seconds)
                rss_before = psutil.Process(service.pid).memory_info().rss
                phase = asyncio.run(offer(url, due, events))
                metrics = service_metrics(url)
                open_sessions = max(metrics["fedanom_serve_open_sessions"], 1.0)
                phase |= {
                    "rate": rate,
                    "open_sessions": metrics["fedanom_serve_open_sessions"],
                    "held_bytes_per_session": metrics["fedanom_serve_open_session_bytes"] / open_sessions,
                    "rss_growth_per_session": (psutil.Process(service.pid).memory_info().rss - rss_before)
                    / open_sessions,
                    "ratio_to_batch": phase["sustained_per_s"] / results["batch"]["per_s"],  # type: ignore[index]
                }
                print(json.dumps(phase), flush=True)
                phases.append(phase)
            results["phases"] = phases
        finally:
            service.terminate()
            service.wait(timeout=60)
            log.close()
    (args.out / "serve.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
