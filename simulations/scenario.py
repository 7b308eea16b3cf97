"""A simulation's merchants: whose traffic, how it is split among them, and which of it is bots.

Merchants come from the synthetic shop generator (different sizes and catalogues), from real exports
(one file each, any preset), or from one file split by a partitioner:

- `natural:COLUMN`: by the value of a column (`category_id`, ...), hashed into N merchants;
- `dirichlet:ALPHA`: each category's users spread over merchants by Dirichlet(ALPHA) weights (a user goes
  where their most frequent category sends them), so small ALPHA gives merchants different catalogues;
- `quantity:ALPHA`: merchant sizes drawn from Dirichlet(ALPHA), users assigned at those rates.

Users are never split across merchants. Every merchant then gets labelled bot sessions of every attack
type, in proportion to its traffic but at least MIN_BOTS of each (bots do not spare small shops), and
is cut in time: events before the cut (train + validation, what
the merchant trains on) and from the cut on (its test set). The `unlabelled` smallest merchants keep no
record of their attacks (a small shop has no fraud team): they train and calibrate without labels, and the
truth about their bots only measures them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedanom.common.errors import FedanomError
from fedanom.simulations.attacks import ATTACKS, inject
from fedanom.simulations.real import real_shop
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

TEST_SHARE = 0.2  # by default the latest fifth of each merchant's events is its test set
EVENTS_PER_BOT = 1_500  # one bot session of each attack type per this many events (at least MIN_BOTS)
MIN_BOTS = 3
# synthetic merchants log logins (the real samples do not), so that credential stuffing shows
LOGIN_SESSIONS = 0.15


@dataclass(frozen=True)
class MerchantData:
    """One simulated merchant's files (Taobao layout) and the truth about its bots."""

    name: str
    fit_path: Path  # events before the cut: what the merchant trains and validates on
    test_path: Path  # events from the cut on
    bots: dict[str, str]  # user id -> attack name, for every injected bot user
    events: int
    labelled: bool  # whether the merchant knows its past attacks (its training bots are labels to it)


def shop_sizes(n: int, scale: float) -> list[int]:
    """N falling sizes, each half the last, the smallest at least 2,000 events."""
    return [max(2_000, int(24_000 * scale / 2**i)) for i in range(n)]


def synthetic_shops(sizes: list[int], seed: int) -> list[tuple[str, pd.DataFrame]]:
    """Shops of the given sizes (events), each with its own catalogue: the small merchants are the ones
    federation should help. Shoppers follow the generator's defaults, calibrated to the real samples,
    and log in at the start of LOGIN_SESSIONS of sessions."""
    shops = []
    for i, events in enumerate(sizes):
        config = ShopConfig(
            n_events=events,
            n_users=max(200, events // 10),
            n_items=max(500, events // 4),
            p_login=LOGIN_SESSIONS,
        )
        shops.append((f"shop-{i + 1}", generate_shop(config, seed=seed * 1_000 + i)))
    return shops


def real_shops(files: list[tuple[Path, str]]) -> list[tuple[str, pd.DataFrame]]:
    return [(f"{preset}:{path.name}", real_shop(path, preset)) for path, preset in files]


def partition(frame: pd.DataFrame, n: int, how: str, seed: int) -> list[pd.DataFrame]:
    """Split one shop's events among n merchants, users kept whole (see the module docstring)."""
    kind, _, arg = how.partition(":")
    rng = np.random.default_rng(seed)
    users = frame.groupby("user_id", sort=True)
    if kind == "natural":
        if arg not in frame.columns:
            raise FedanomError(
                f"--partition natural:{arg}: no column '{arg}' (have {', '.join(frame.columns)})"
            )
        first = users[arg].agg(lambda s: s.mode().iloc[0])
        owner = first.map(lambda v: zlib.crc32(str(v).encode()) % n)
    elif kind in ("dirichlet", "quantity"):
        try:
            alpha = float(arg)
        except ValueError:
            raise FedanomError(f"--partition {how}: ALPHA must be a number") from None
        if alpha <= 0:
            raise FedanomError(f"--partition {how}: ALPHA must be positive")
        if kind == "quantity":
            sizes = rng.dirichlet(np.full(n, alpha))
            owner = pd.Series(rng.choice(n, size=users.ngroups, p=sizes), index=users.size().index)
        else:
            main = users["category_id"].agg(lambda s: s.mode().iloc[0])
            weights = {c: rng.dirichlet(np.full(n, alpha)) for c in main.unique()}
            owner = main.map(lambda c: rng.choice(n, p=weights[c]))
    else:
        raise FedanomError(f"--partition '{how}': use natural:COLUMN, dirichlet:ALPHA or quantity:ALPHA")
    assigned = frame.user_id.map(owner)
    parts = [frame[assigned.to_numpy() == k].reset_index(drop=True) for k in range(n)]
    if any(len(p) == 0 for p in parts):
        raise FedanomError(f"--partition {how} left a merchant without events; try fewer merchants")
    return parts


def prepare(
    shops: list[tuple[str, pd.DataFrame]],
    out: Path,
    seed: int,
    test_share: float = TEST_SHARE,
    unlabelled: int = 0,
) -> list[MerchantData]:
    """Inject every attack into every shop, cut each in time (the latest `test_share` of its events are
    its test set), write the files; the `unlabelled` shops with the fewest events know none of their
    attacks."""
    smallest = set(sorted(range(len(shops)), key=lambda i: (len(shops[i][1]), i))[:unlabelled])
    out.mkdir(parents=True, exist_ok=True)
    merchants = []
    for i, (name, frame) in enumerate(shops):
        per_attack = max(MIN_BOTS, len(frame) // EVENTS_PER_BOT)
        events = inject(frame, dict.fromkeys(ATTACKS, per_attack), seed=seed * 1_000 + i)
        cut = np.quantile(events.timestamp, 1.0 - test_share)
        fit, test = events[events.timestamp < cut], events[events.timestamp >= cut]
        bots = events[events.attack != ""].drop_duplicates("user_id")
        merchants.append(
            MerchantData(
                name=name,
                fit_path=write_taobao_csv(fit, out / f"merchant-{i}-fit.csv"),
                test_path=write_taobao_csv(test, out / f"merchant-{i}-test.csv"),
                bots=dict(zip(bots.user_id.astype(str), bots.attack, strict=True)),
                events=len(events),
                labelled=i not in smallest,
            )
        )
    return merchants
