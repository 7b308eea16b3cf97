"""Ingest benchmark: events/s and peak memory of read + validate + sessionize + tokenize.

Each measurement runs in a fresh subprocess, so its peak RSS is its own, and is repeated; the baseline,
plain `pandas.read_csv` of the same file, is measured in the same run because absolute times drift on
these machines. Usage:

    python benchmarks/ingest.py --events 1000000 5000000 10000000 [--repeat 3] [--items 500000]

Peak memory is one read block + one partition + the item-popularity table, which grows with the shop's
catalogue (distinct items), not with the length of its log; so the catalogue is held fixed across sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "pandas.read_csv": "baseline: parse the CSV into a DataFrame, nothing else",
    "fedanom ingest": "read + validate + partition by session/user + item popularity",
    "fedanom end-to-end": "ingest + sessionize + behaviour tokens for every event",
}


def child(mode: str, path: str) -> None:
    """Run one measurement (imports excluded from the time) and print its JSON result."""
    import pandas as pd

    from fedanom.common.ingest import ingest
    from fedanom.common.presets import resolve_preset
    from fedanom.common.tokens import encode

    start = time.perf_counter()
    if mode == "pandas.read_csv":
        events = len(pd.read_csv(path, header=None))
    else:
        ingested = ingest(path, resolve_preset("taobao"))
        events = ingested.report.rows_kept
        if mode == "fedanom end-to-end":
            tokens = sum(len(encode(batch, ingested.popularity)) for batch in ingested.batches())
            assert tokens == events
    seconds = time.perf_counter() - start
    print(json.dumps({"events": events, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own high-water RSS. (ru_maxrss is not: Linux carries it over from the forking
    parent across exec, so a child of a big parent would report the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(mode: str, path: Path, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "events": runs[0]["events"],
        "seconds": seconds,
        "events_per_s": runs[0]["events"] / seconds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--items", type=int, default=500_000, help="catalogue size, fixed across file sizes as in a real shop"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.events:
        path = args.out / f"shop-{n}-{args.items}.csv"
        if not path.exists():
            config = ShopConfig(n_events=n, n_users=n // 5, n_items=args.items, span_days=30)
            write_taobao_csv(generate_shop(config, seed=1), path)
        base = None
        for mode in MODES:
            row = {"mode": mode, "file_mb": path.stat().st_size / 2**20, **measure(mode, path, args.repeat)}
            base = base or row["seconds"]
            row["time_vs_read_csv"] = row["seconds"] / base
            results.append(row)
            print(
                f"{n:>10,} events  {mode:<20} {row['seconds']:6.2f} s"
                f"  {row['events_per_s'] / 1e6:5.2f} M events/s  peak {row['peak_rss_mb']:7.0f} MB"
                f"  x{row['time_vs_read_csv']:.2f} of read_csv",
                flush=True,
            )
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    (args.out / "ingest.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
