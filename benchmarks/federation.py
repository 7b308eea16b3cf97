"""Federation benchmarks: what one merchant sends per round, and a round's wall time in simulation.

    python benchmarks/federation.py [--out bench-out]

1. Bytes a merchant sends per round (the serialised ArrayRecord of its adapter update, as Flower ships
   it) against the full backbone's weights, for FFA-LoRA (B only) and plain LoRA (A and B), at the
   default model size and a larger one.
2. Wall time of a round with 3 virtual merchants on Flower's Simulation Engine (Ray), split into
   local training (the merchants' reports) and the rest (communication, aggregation, start-up).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import warnings
from pathlib import Path

from flwr.simulation import run_simulation

from fedanom.client.app import app as client_app
from fedanom.common.artifact import save_backbone
from fedanom.common.model import BackboneConfig, LoraSettings, attach_lora, trainable_state
from fedanom.common.records import to_record
from fedanom.server.app import build_app
from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def traffic() -> dict[str, dict[str, float]]:
    out = {}
    for label, config in (
        ("default d=64 x2", BackboneConfig()),
        ("d=256 x4", BackboneConfig(d_model=256, n_layers=4)),
    ):
        backbone_bytes = sum(p.numel() * p.element_size() for p in config.build().parameters())
        for ffa in (True, False):
            update = trainable_state(attach_lora(config.build(), LoraSettings(ffa=ffa)))
            sent = to_record(update).count_bytes()
            out[f"{label}, {'FFA-LoRA' if ffa else 'LoRA'}"] = {
                "update_bytes": sent,
                "backbone_bytes": backbone_bytes,
                "share_of_backbone": sent / backbone_bytes,
            }
    return out


def round_time(workdir: Path, rounds: int = 3) -> dict[str, float]:
    save_backbone(BackboneConfig().build(), workdir / "base", {"benchmark": True})
    files = []
    for i in range(3):
        shop = generate_shop(ShopConfig(n_events=20_000, n_users=2_000, n_items=5_000), seed=70 + i)
        files.append(
            str(write_taobao_csv(inject(shop, {"scraping-crude": 5}, seed=i), workdir / f"m{i}.csv"))
        )
    overrides: dict[str, bool | float | int | str] = {
        "num-server-rounds": rounds,
        "min-nodes": 3,
        "base": str(workdir / "base"),
        "sim-data": ";".join(files),
        "sim-preset": "taobao",
        "sim-state-root": str(workdir / "state"),
        "run-dir": str(workdir / "run"),
    }
    started = time.perf_counter()
    run_simulation(
        server_app=build_app(overrides),
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (workdir / "run" / "rounds.jsonl").read_text().splitlines()]
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(log)]
    return {
        "rounds": rounds,
        "total_seconds": total,
        "seconds_between_round_ends": sum(gaps) / max(len(gaps), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"traffic": traffic()}
    print(json.dumps(results["traffic"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["simulated_round"] = round_time(Path(tmp))
    print(json.dumps(results["simulated_round"], indent=1))
    (args.out / "federation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
