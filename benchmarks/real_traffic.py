"""Real traffic: every method on real exports from ../shared/data with injected bots, over several seeds.

    python benchmarks/real_traffic.py [--seeds 0-2] [--scenarios unlike,like,starved] [--out DIR]
                                      [-- EXTRA SIMULATE ARGS]

Each scenario is one `fedanom simulate` run per seed (the real ServerApp and ClientApp on Flower's
Simulation Engine, every method on the same sessions):

- `unlike`: the five real shops as five merchants;
- `like`: the REES46 sample split among 4 merchants by a Dirichlet(1) partition over categories, users kept
  whole: the merchants a federation exists for;
- `starved`: the longer YOOCHOOSE sample split among 4 merchants of Dirichlet(1) sizes; the smallest is
  data-starved and knows none of its attacks, and it is reported on its own.

The backbone is pretrained on a synthetic public shop, so it has seen neither the period nor the shop it
is evaluated on. Prints, per scenario and method, the mean and spread over seeds of the merchants' mean
AUPRC, AUROC, recall at 1% FPR and false-alert rate at the 1% alert level (each merchant's later, unseen
normal sessions above its validation's 1% level), then per attack type AUROC and recall at 1% FPR; every
run's results.json stays under --out. A run whose results.json is already there is read, not run
again (an interrupted benchmark resumes): remove --out to measure changed code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SHOPS = {
    "taobao": "taobao-userbehavior/UserBehavior_2017-11-26_window.csv.gz",
    "rees46": "rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz",
    "yoochoose": "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.tsv.gz",
    "diginetica": "diginetica-sample/sample_train-item-views.csv.gz",
    "talkingdata": "talkingdata-adtracking-sample/train_sample.csv.gz",
}
# the starved merchant needs a longer log to split: 70k events, so that the smallest of four still has a
# few hundred normal test sessions (the 13.5k-event file left it one in a seed)
YOOCHOOSE_LONG = "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.tsv.gz"
SCENARIOS: dict[str, list[str]] = {
    "unlike": [arg for preset, path in SHOPS.items() for arg in ("--data", f"{DATA / path}:{preset}")],
    "like": [
        "--data",
        f"{DATA / SHOPS['rees46']}:rees46",
        "--partition",
        "dirichlet:1.0",
        "--merchants",
        "4",
    ],
    "starved": [
        *("--data", f"{DATA / YOOCHOOSE_LONG}:yoochoose", "--partition", "quantity:1.0"),
        *("--merchants", "4", "--unlabelled", "1"),
    ],
}
HEADLINE = ("auprc", "auroc", "recall_at_1pct_fpr", "false_alert_rate")


def seeds(spec: str) -> list[int]:
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run(scenario: str, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    target = out / scenario / f"seed-{seed}"
    if not (target / "results.json").exists():
        command = [sys.executable, "-m", "fedanom", "simulate", "--out", str(target), "--seed", str(seed)]
        subprocess.run(command + SCENARIOS[scenario] + extra, check=True, stderr=subprocess.DEVNULL)
    results: dict[str, Any] = json.loads((target / "results.json").read_text())
    print(f"{scenario} seed {seed}: {results['scenario']['seconds']:.0f} s", file=sys.stderr)
    return results


def merchants_of(scenario: str, results: dict[str, Any]) -> list[int]:
    """Which merchants a scenario reports: all, or for `starved` the smallest alone."""
    if scenario != "starved":
        return list(range(len(results["merchants"])))
    events = [m["events"] for m in results["scenario"]["merchants"]]
    return [events.index(min(events))]


def summary(scenario: str, runs: list[dict[str, Any]]) -> list[str]:
    methods = list(runs[0]["methods"])
    lines = [f"### {scenario} ({len(runs)} seeds; mean ± standard deviation over seeds)", ""]
    lines += ["| method | " + " | ".join(HEADLINE) + " |", "|---|" + "---:|" * len(HEADLINE)]
    for method in methods:
        cells = []
        for key in HEADLINE:
            per_seed = [_mean(r, scenario, method, key) for r in runs]
            spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            cells.append(f"{statistics.mean(per_seed):.3f} ± {spread:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for key in ("per_attack_auroc", "per_attack_recall_at_1pct_fpr"):
        kinds = sorted({k for r in runs for m in r["methods"][methods[0]]["per_merchant"] for k in m[key]})
        lines += ["", f"{key} (mean over merchants and seeds)", ""]
        lines += ["| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for method in methods:
            cells = []
            for kind in kinds:
                values = [
                    r["methods"][method]["per_merchant"][i][key][kind]
                    for r in runs
                    for i in merchants_of(scenario, r)
                    if kind in r["methods"][method]["per_merchant"][i][key]
                ]
                cells.append(f"{statistics.mean(values):.2f}" if values else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _mean(results: dict[str, Any], scenario: str, method: str, key: str) -> float:
    per = results["methods"][method]["per_merchant"]
    return statistics.mean(per[i][key] for i in merchants_of(scenario, results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", default="0-2", help="first-last, e.g. 0-2")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/real-traffic"))
    parser.add_argument("simulate", nargs="*", help="more fedanom simulate arguments, after --")
    args = parser.parse_args()
    for scenario in args.scenarios.split(","):
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario}; choose from {', '.join(SCENARIOS)}")
        runs = [run(scenario, seed, args.out, args.simulate) for seed in seeds(args.seeds)]
        print("\n".join(summary(scenario, runs)), flush=True)


if __name__ == "__main__":
    main()
