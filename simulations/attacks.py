"""Attack injectors: labelled bot sessions added to a shop's normal traffic.

Each follows an OWASP Automated Threat and comes in a crude variant (script-speed, obvious to rate
features) and a human-mimicking one (human gaps and session lengths), so that rate features alone
cannot win. Injected sessions belong to fresh user ids and carry their attack name in `attack`.
Issue #5 extends the registry to the full taxonomy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Attack:
    name: str
    threat: str  # OWASP Automated Threat id
    sessions: Callable[[np.random.Generator, pd.DataFrame], pd.DataFrame]  # one bot session, no user/time


def _scrape(
    rng: np.random.Generator, shop: pd.DataFrame, *, n: int, gap: Callable[[int], np.ndarray]
) -> pd.DataFrame:
    """Walk the catalogue: every event a new, mostly obscure item (uniform over all items, not popularity)."""
    catalogue = shop[["item_id", "category_id"]].drop_duplicates("item_id")
    picks = catalogue.iloc[rng.choice(len(catalogue), size=n, replace=False)]
    return pd.DataFrame(
        {
            "item_id": picks.item_id.to_numpy(),
            "category_id": picks.category_id.to_numpy(),
            "event_type": _browsing(shop),
            "offset_s": np.cumsum(gap(n)),
        }
    )


def _click_fraud(
    rng: np.random.Generator, shop: pd.DataFrame, *, n: int, gap: Callable[[int], np.ndarray]
) -> pd.DataFrame:
    """Click the same promoted item or two again and again, never buying."""
    targets = shop.sample(2, random_state=int(rng.integers(1 << 31)))
    picks = targets.iloc[rng.integers(0, 2, n)]
    return pd.DataFrame(
        {
            "item_id": picks.item_id.to_numpy(),
            "category_id": picks.category_id.to_numpy(),
            "event_type": _browsing(shop),
            "offset_s": np.cumsum(gap(n)),
        }
    )


def _browsing(shop: pd.DataFrame) -> str:
    """The shop's own most common event (a view, or a click where only clicks are logged): bots browse
    the way the shop records browsing, so the event type alone does not give them away."""
    return str(shop.event_type.mode().iloc[0])


def _human_gaps(rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    return lambda n: np.where(np.arange(n) == 0, 0.0, rng.lognormal(np.log(20.0), 0.9, n))


def _script_gaps(rng: np.random.Generator, period: float) -> Callable[[int], np.ndarray]:
    return lambda n: np.where(np.arange(n) == 0, 0.0, rng.uniform(0.8 * period, 1.2 * period, n))


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in [
        Attack(
            "scraping-crude",
            "OAT-011",
            lambda r, s: _scrape(r, s, n=int(r.integers(40, 120)), gap=_script_gaps(r, 1.0)),
        ),
        Attack(
            "scraping-mimic",
            "OAT-011",
            lambda r, s: _scrape(r, s, n=int(r.integers(6, 25)), gap=_human_gaps(r)),
        ),
        Attack(
            "click-fraud-crude",
            "OAT-016",
            lambda r, s: _click_fraud(r, s, n=int(r.integers(20, 60)), gap=_script_gaps(r, 2.0)),
        ),
        Attack(
            "click-fraud-mimic",
            "OAT-016",
            lambda r, s: _click_fraud(r, s, n=int(r.integers(5, 15)), gap=_human_gaps(r)),
        ),
    ]
}


def inject(shop: pd.DataFrame, attacks: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """The shop's events plus `attacks[name]` bot sessions of each kind, spread over its time span.

    Returns the Taobao-layout columns plus `attack` ("" for normal traffic), sorted by time.
    """
    rng = np.random.default_rng(seed)
    start, end = int(shop.timestamp.min()), int(shop.timestamp.max())
    next_user = int(shop.user_id.max()) + 1_000_000
    frames = [shop.assign(attack="")]
    for name, count in attacks.items():
        attack = ATTACKS[name]
        for _ in range(count):
            session = attack.sessions(rng, shop)
            offsets = session.pop("offset_s").to_numpy()
            session["timestamp"] = (int(rng.integers(start, end)) + offsets).astype(np.int64)
            frames.append(session.assign(user_id=next_user, attack=name))
            next_user += 1
    out = pd.concat(frames, ignore_index=True)
    return out[[*shop.columns, "attack"]].sort_values("timestamp", kind="stable", ignore_index=True)
