"""Does federation help the smallest merchant? The same `fedanom simulate` scenario over several seeds,
the smallest merchant's test AUPRC per method, and federated + DP paired against local-only.

    python benchmarks/smallest_merchant.py --seeds 0-5 [--out bench-out/smallest] -- SIMULATE ARGS...

e.g. `-- --merchants 3 --rounds 2 --scale 0.25 --d-model 32 --layers 1` (the test suite's scenario).
One seed's smallest merchant has ~10-40 test bots, so one run cannot order two methods that differ by a
few hundredths of AUPRC: this script reports how often and by how much federated + DP is ahead, with a
paired t statistic, and writes every run's results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def seeds(spec: str) -> list[int]:
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def smallest_auprc(results: dict) -> dict[str, float]:
    """Per method, the test AUPRC of the merchant with the fewest events."""
    events = [m["events"] for m in results["scenario"]["merchants"]]
    smallest = events.index(min(events))
    return {method: v["per_merchant"][smallest]["auprc"] for method, v in results["methods"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", default="0-5", help="first-last, e.g. 0-5")
    parser.add_argument("--out", type=Path, default=Path("bench-out/smallest"))
    parser.add_argument("simulate", nargs="*", help="fedanom simulate's own arguments, after --")
    args = parser.parse_args()
    rows = {}
    for seed in seeds(args.seeds):
        out = args.out / f"seed-{seed}"
        command = [sys.executable, "-m", "fedanom", "simulate", "--out", str(out), "--seed", str(seed)]
        subprocess.run(command + args.simulate, check=True, stderr=subprocess.DEVNULL)
        results = json.loads((out / "results.json").read_text())
        rows[seed] = smallest_auprc(results)
        print(f"seed {seed}: {results['scenario']['seconds']:.0f} s", file=sys.stderr)
    methods = list(next(iter(rows.values())))
    print("| smallest merchant's test AUPRC | " + " | ".join(f"seed {s}" for s in rows) + " | mean |")
    print("|---|" + "---:|" * (len(rows) + 1))
    for method in methods:
        values = [rows[s][method] for s in rows]
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {method} | {cells} | {statistics.mean(values):.3f} |")
    diffs = [rows[s]["federated-dp"] - rows[s]["local-only"] for s in rows]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    t = statistics.mean(diffs) / (spread / len(diffs) ** 0.5) if spread else float("nan")
    ahead = sum(d > 0 for d in diffs)
    print(
        f"\nfederated-dp - local-only: {', '.join(f'{d:+.3f}' for d in diffs)}; ahead in {ahead} of "
        f"{len(diffs)}, mean {statistics.mean(diffs):+.3f}, paired t = {t:.2f}"
    )


if __name__ == "__main__":
    main()
