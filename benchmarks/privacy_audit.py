"""An empirical privacy audit: membership inference against DP-trained adapters (issue #16, item 3).

    python benchmarks/privacy_audit.py [--epsilons 1,4,8] [--seed 0] [--out bench-out]

For each shop, shoppers are split at random into members (their sessions train the adapter) and
non-members (same shop, never trained on). The adapter is trained with today's defaults (`TrainSettings`,
δ = 1/training units) without DP and at each ε, once per privacy unit (a session, or a shopper with all
their sessions), on the backbone a simulation pretrains on a separate synthetic public shop. Two attacks
then guess who was a member, from each shopper's mean per-event surprise (NLL) over their sessions:

- **loss threshold** (Yeom et al.): a member's sessions are less surprising to the trained model;
- **calibrated likelihood ratio** (offline, per example; Watson et al.'s difficulty calibration, the
  reference-model half of LiRA): the drop in surprise from the untrained model (same backbone, zero
  adapter) to the trained one, so shoppers who are easy for any model do not look like members.

Reported as the attack's AUC and its true-positive rate at 1% false positives. Shops:

- a synthetic shop with planted **canary shoppers**: each repeats one random, improbable session (random
  event types, items and pace), once (`canary-1`) or twenty times (`canary-20`); half of each group are
  members. Canaries are the worst case an audit can plant: unique, and under session-level DP a shopper
  with ten sessions is protected as ten units, not one;
- the real REES46 sample in ../shared/data (no canaries).

An AUC near 0.5 for the model trained without DP would mean the audit, not DP, is what fails to tell
members apart: the canaries are there so that it does not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.scoring import event_surprise
from fedanom.common.detector.training import privacy_units, train_model
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import PRIVACY_UNITS, BackboneConfig, TrainSettings
from fedanom.common.tokens import Popularity
from fedanom.common.windows import Windows
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv
from fedanom.simulations.study import pretrain_public_backbone

REES46 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46-multicategory"
CANARIES = 100  # per group: half members, half not
CANARY_EVENTS = 12
CANARY_GAPS_S = (2, 20, 200)
CANARY_USER = 10_000_000  # canary user ids start here
CANARY_REPEATS = 20  # the heavy canaries' sessions: the same improbable session, this many times


def canary_shop(seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """A synthetic shop with canary shoppers planted in it, and each canary's group by user id."""
    shop = generate_shop(ShopConfig(n_events=20_000, n_users=2_000, n_items=10_000), seed=seed)
    rng = np.random.default_rng(seed + 1)
    start, end = int(shop.timestamp.min()), int(shop.timestamp.max())
    rows, groups = [], {}
    for c in range(2 * CANARIES):
        repeats = 1 if c < CANARIES else CANARY_REPEATS
        user = CANARY_USER + c
        groups[str(user)] = f"canary-{repeats}"
        kinds = rng.choice(["pv", "cart", "fav", "buy"], CANARY_EVENTS)
        items = rng.integers(1, 10_000, CANARY_EVENTS)
        offsets = np.cumsum(rng.choice(CANARY_GAPS_S, CANARY_EVENTS))
        first = int(rng.integers(start, end - repeats * 4 * 3600))
        for r in range(repeats):  # sessions 4 hours apart: each its own session
            for kind, item, offset in zip(kinds, items, offsets, strict=True):
                rows.append((user, int(item), int(item) % 500, str(kind), first + r * 4 * 3600 + int(offset)))
    canaries = pd.DataFrame(rows, columns=["user_id", "item_id", "category_id", "event_type", "timestamp"])
    return pd.concat([shop, canaries], ignore_index=True), groups


def windows_of(path: Path, preset: str) -> tuple[Windows, Popularity]:
    ingested = ingest(path, resolve_preset(preset))
    return Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report), ingested.popularity


def per_user_loss(model: torch.nn.Module, windows: Windows, users: np.ndarray) -> np.ndarray:
    """Each shopper's mean per-event NLL over their sessions, in the order of `users`."""
    surprise = event_surprise(model, windows)
    bounds = zip(windows.offsets[:-1], windows.offsets[1:], strict=True)
    per_window = [surprise.event[lo:hi].mean() for lo, hi in bounds]
    frame = pd.DataFrame({"user": windows.user, "loss": per_window}).groupby("user").loss.mean()
    return frame.reindex(users).to_numpy()


def attack(score: np.ndarray, member: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 1% FPR of guessing `member` from `score` (higher: more likely a member)."""
    fpr, tpr, _ = roc_curve(member, score)
    return {"auc": float(roc_auc_score(member, score)), "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr))}


def audit(
    shop: tuple[Windows, Popularity],
    groups: dict[str, str],
    base: Path,
    epsilons: list[float],
    seed: int,
    work: Path,
) -> dict[str, Any]:
    windows, popularity = shop
    users = np.array(sorted(set(windows.user)))
    rng = np.random.default_rng(seed)
    member = rng.random(len(users)) < 0.5
    for group in set(groups.values()):  # exactly half of each canary group
        mine = np.flatnonzero([groups.get(u) == group for u in users])
        member[mine] = np.arange(len(mine)) % 2 == 0
    members = set(users[member])
    training = windows.select(np.array([u in members for u in windows.user]))
    kind = np.array([groups.get(u, "shopper") for u in users])
    results: dict[str, Any] = {"users": len(users), "training_sessions": training.n_windows, "settings": {}}
    runs: list[tuple[float | None, str]] = [(None, "session")]
    runs += [(epsilon, unit) for epsilon in epsilons for unit in PRIVACY_UNITS]
    for epsilon, unit in runs:
        detector = BehaviourDetector.from_backbone(base, popularity, device="cpu")
        before = per_user_loss(detector.model, windows, users)  # zero adapter: the reference model
        settings = TrainSettings(dp=epsilon is not None, seed=seed, privacy_unit=unit)
        ledger = None
        if epsilon is not None:
            delta = 1.0 / privacy_units(training, settings)
            state = work / f"ledger-{epsilon:g}-{unit}"
            ledger = PrivacyLedger.open(state, epsilon_budget=epsilon, delta=delta, unit=unit)
        report = train_model(detector.model, training, settings, ledger=ledger)
        after = per_user_loss(detector.model, windows, users)
        name = "no DP" if epsilon is None else f"ε={epsilon:g} per {unit}"
        row: dict[str, Any] = {
            "epsilon_spent": report.epsilon_spent,
            "delta": report.delta,
            "noise_multiplier": report.noise_multiplier,
            "steps": report.steps,
            "seconds": report.seconds,
        }
        for who in ["all", *sorted(set(groups.values()))]:
            pick = np.ones(len(users), bool) if who == "all" else kind == who
            row[who] = {
                "loss": attack(-after[pick], member[pick]),
                "calibrated": attack(before[pick] - after[pick], member[pick]),
            }
        results["settings"][name] = row
        print(name, json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = pretrain_public_backbone(work, BackboneConfig(), args.seed)
        shop, groups = canary_shop(args.seed)
        planted = windows_of(write_taobao_csv(shop, work / "canaries.csv"), "taobao")
        print("synthetic shop with canaries", flush=True)
        results["canary shop"] = audit(planted, groups, base, epsilons, args.seed, work / "canary")
        print("REES46 sample", flush=True)
        rees46 = windows_of(next(REES46.glob("*.csv.gz")), "rees46")
        results["rees46"] = audit(rees46, {}, base, epsilons, args.seed, work / "rees46")
    (args.out / "privacy_audit.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
