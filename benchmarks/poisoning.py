"""Poisoning: the global detector's quality when some merchants are hostile, per aggregation.

    python benchmarks/poisoning.py [--seed 0] [--rounds 2] [--settings 1/3,2/5] [--out DIR]
                                   [--attacks sign-flip,scaled,inflated-count,small-colluding]
                                   [--aggregations fedavg,trimmed-mean,median]

The like merchants of benchmarks/real_traffic.py (the REES46 sample split by a Dirichlet(1) partition,
users kept whole, bots injected, every merchant knowing its past attacks), federated with DP at ε = 8
through the real ServerApp and ClientApp on Flower's Simulation Engine; the smallest merchant knows no
attacks, as in `fedanom simulate`. The last merchants of each
setting (1 of 3, 2 of 5) are hostile: they train on their own data as everyone does, then a Flower mod on
their ClientApp rewrites their reply before it leaves:

- `sign-flip`: the change from the global adapter, negated;
- `scaled`: negated and made ten times as large (model replacement);
- `inflated-count`: negated, claiming 100 million training sessions;
- `small-colluding`: the change shrunk a hundredfold by every hostile merchant (together they drag a
  median-based norm bound below every honest update).

Prints, per setting, aggregation and attack, the honest merchants' mean test AUPRC of the federated
detector each keeps after the last round (threshold and metrics as `fedanom simulate` computes them),
the difference from the honest run, and what the server's log says it did with the hostile updates.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedanom.common.records import to_numpy, to_record
from fedanom.common.settings import BackboneConfig
from fedanom.simulations.compare import Comparison, Sessions, federated, load_sessions, metrics
from fedanom.simulations.scenario import MerchantData, partition, prepare, real_shops
from fedanom.simulations.study import pretrain_public_backbone

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
REES46 = DATA / "rees46-multicategory" / "2019-Oct_sample_ibrhmspl.csv.gz"
ATTACKS = ("sign-flip", "scaled", "inflated-count", "small-colluding")
PLAN = "FEDANOM_POISONING"  # "ATTACK:N": the merchants with partition id >= N attack (read in Ray actors)


def hostile(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod on every merchant's ClientApp: the planned ones rewrite their training reply."""
    reply = call_next(msg, context)
    attack, _, first = os.environ.get(PLAN, "").partition(":")
    if not attack or int(context.node_config["partition-id"]) < int(first):
        return reply
    if msg.metadata.message_type != "train" or reply.has_error():
        return reply
    received = to_numpy(msg.content.array_records["arrays"])
    sent = to_numpy(reply.content.array_records["arrays"])
    factor = {"sign-flip": -1.0, "scaled": -10.0, "inflated-count": -1.0, "small-colluding": 0.01}[attack]
    reply.content["arrays"] = to_record({k: received[k] + factor * (sent[k] - received[k]) for k in received})
    if attack == "inflated-count":
        reply.content.metric_records["metrics"]["num-examples"] = 1e8
    return reply


@functools.cache
def merchants_of(setting: str, seed: int, out: Path) -> tuple[list[MerchantData], list[Sessions], Path]:
    """The setting's merchants, their sessions and the backbone, prepared once for all its runs."""
    count = int(setting.partition("/")[2])
    work = out / f"seed-{seed}" / setting.replace("/", "-of-") / "work"
    ((name, frame),) = real_shops([(REES46, "rees46")])
    parts = partition(frame, count, "dirichlet:1.0", seed)
    prepared = prepare(
        [(f"{name}#{k + 1}", p) for k, p in enumerate(parts)], work / "merchants", seed, unlabelled=1
    )
    base = pretrain_public_backbone(work, BackboneConfig(), seed)
    return prepared, [load_sessions(m, work) for m in prepared], base


def run(setting: str, aggregation: str, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    target = args.out / f"seed-{args.seed}" / setting.replace("/", "-of-") / aggregation / attack
    if (target / "result.json").exists():
        return dict(json.loads((target / "result.json").read_text()))
    prepared, sessions, base = merchants_of(setting, args.seed, args.out)
    honest = len(prepared) - int(setting.partition("/")[0])
    os.environ[PLAN] = "" if attack == "honest" else f"{attack}:{honest}"
    try:
        scores, log = federated(
            prepared,
            sessions,
            base,
            target / "run",
            args.rounds,
            8.0,
            True,
            args.seed,
            True,
            mods=[hostile],
            overrides={"aggregation": aggregation},
        )
    finally:
        os.environ.pop(PLAN)
    measured = metrics(sessions[:honest], Comparison(scores={"federated-dp": scores[:honest]}))
    fate = [
        f"rejected {len(r['rejected'])}, clipped {len(r['clipped'])}, largest weight "
        f"{max(r['weights'].values()) / sum(r['weights'].values()):.2f}"
        if r["weights"]
        else f"rejected {len(r['rejected'])}, nothing averaged"
        for r in log
    ]
    result = {"auprc": float(np.mean([m["auprc"] for m in measured["federated-dp"]])), "log": fate}
    (target / "result.json").write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="1/3,2/5", help="hostile/merchants, comma-separated")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--aggregations", default="fedavg,trimmed-mean,median")
    parser.add_argument("--out", type=Path, default=Path("bench-out/poisoning"))
    args = parser.parse_args()
    print("| hostile | aggregation | attack | honest merchants' AUPRC | vs no attack | server, per round |")
    print("|---|---|---|---:|---:|---|")
    for setting in args.settings.split(","):
        for aggregation in args.aggregations.split(","):
            clean = run(setting, aggregation, "honest", args)
            print(
                f"| {setting} | {aggregation} | none | {clean['auprc']:.3f} | | {'; '.join(clean['log'])} |"
            )
            for attack in args.attacks.split(","):
                got = run(setting, aggregation, attack, args)
                print(
                    f"| {setting} | {aggregation} | {attack} | {got['auprc']:.3f} | "
                    f"{got['auprc'] - clean['auprc']:+.3f} | {'; '.join(got['log'])} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
