"""A synthetic shop's normal traffic: sessions of views, favourites, carts and purchases.

Vectorised so that millions of events take seconds: the loader benchmark, the tests and `make demo` all
need realistic-looking exports without shipping any real data. The defaults are calibrated to the real
samples in ../shared/data (simulations.calibration measures both and holds the targets): geometric
session lengths (mean ~3.8 events), log-normal gaps (median ~50 s), Zipf item popularity with a quarter
of events returning to an item already seen, and a view-heavy funnel in which carts and purchases
happen in the few sessions that come to shop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ShopConfig:
    n_events: int = 100_000
    n_users: int = 20_000
    n_items: int = 50_000
    n_categories: int = 500
    mean_session_events: float = 3.6
    median_gap_s: float = 50.0
    gap_sigma: float = 1.2  # of log gaps: p90 / median = exp(1.28 sigma)
    span_days: float = 7.0
    start_unix_s: int = 1_700_000_000
    zipf_a: float = 1.15
    p_repeat_item: float = 0.3  # an event returns to the item just seen
    # the funnel: favourites anywhere; carts only in the sessions that come to shop, purchases after carts
    p_fav: float = 0.025
    p_shopping_session: float = 0.1
    p_cart: float = 0.06  # per event, over all sessions
    p_purchase_after_cart: float = 0.6
    # share of sessions that begin by logging in (the "login page" is item 0): real samples log no
    # logins, but a shop that does shows credential stuffing (OAT-008) as a burst of them
    p_login: float = 0.0


def generate_shop(config: ShopConfig, seed: int = 0) -> pd.DataFrame:
    """Events with columns user_id, item_id, category_id, event_type, timestamp (Unix s), sorted by time."""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(
        1.0 / config.mean_session_events, size=int(config.n_events / config.mean_session_events) + 1
    )
    lengths = lengths[np.cumsum(lengths) <= config.n_events]
    if lengths.sum() < config.n_events:
        lengths = np.append(lengths, config.n_events - lengths.sum())
    n_sessions = len(lengths)
    session_of = np.repeat(np.arange(n_sessions), lengths)
    first = np.zeros(config.n_events, dtype=bool)
    first[np.cumsum(lengths) - lengths] = True

    # some users come back more than others (log-normal activity), but none owns a share of the shop
    activity = rng.lognormal(0.0, 1.0, config.n_users)
    users = rng.choice(config.n_users, size=n_sessions, p=activity / activity.sum())[session_of]
    start = rng.uniform(0, config.span_days * 86_400, n_sessions)[session_of]
    gaps = rng.lognormal(np.log(config.median_gap_s), config.gap_sigma, config.n_events)
    gaps[first] = 0.0
    offset = np.cumsum(gaps)
    offset -= np.repeat(offset[first], lengths)
    timestamp = np.floor(config.start_unix_s + start + offset).astype(np.int64)

    items = _zipf(rng, config.n_items, config.zipf_a, config.n_events)
    again = (rng.random(config.n_events) < config.p_repeat_item) & ~first
    items = np.where(again, np.roll(items, 1), items)
    categories = (items * 2_654_435_761 % config.n_categories).astype(np.int64)

    event = np.full(config.n_events, "pv", dtype=object)
    event[(rng.random(config.n_events) < config.p_fav) & ~first] = "fav"
    shopping = (rng.random(n_sessions) < config.p_shopping_session)[session_of]
    p_cart_shopping = min(1.0, config.p_cart / max(config.p_shopping_session, 1e-9))
    cart = shopping & (rng.random(config.n_events) < p_cart_shopping) & ~first
    event[cart] = "cart"
    # a purchase follows a cart of the same item
    buy = np.roll(cart, 1) & (rng.random(config.n_events) < config.p_purchase_after_cart) & ~first
    event[buy] = "buy"
    items = np.where(buy, np.roll(items, 1), items)
    login = first & (rng.random(config.n_events) < config.p_login)
    event[login] = "login"
    items[login], categories[login] = -1, -1

    frame = pd.DataFrame(
        {
            "user_id": users + 1,
            "item_id": items + 1,
            "category_id": categories + 1,
            "event_type": event,
            "timestamp": timestamp,
        }
    )
    return frame.sort_values("timestamp", kind="stable", ignore_index=True)


def write_taobao_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write events in the Taobao UserBehavior layout (headerless), gzip'd when the name ends in .gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[["user_id", "item_id", "category_id", "event_type", "timestamp"]].to_csv(
        path, header=False, index=False
    )
    return path


def _zipf(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """Ranks 0..n-1 drawn with probability proportional to 1 / (rank + 1)^a."""
    weights = 1.0 / np.arange(1, n + 1) ** a
    cdf = np.cumsum(weights)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)


def main(argv: list[str] | None = None) -> None:
    """`python -m fedanom.simulations.shop OUT.csv`: write a synthetic shop export (Taobao layout)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bad-rows", type=int, default=0, help="append this many malformed rows, to see them quarantined"
    )
    args = parser.parse_args(argv)
    config = ShopConfig(
        n_events=args.events, n_users=max(args.events // 10, 1), n_items=max(args.events // 4, 1)
    )
    path = write_taobao_csv(generate_shop(config, seed=args.seed), args.out)
    broken = [
        "17,2268318,2520377,teleport,1700000000",
        "18,,2520377,pv,1700000000",
        "19,5,6,pv,yesterday",
        "20,5,6",
    ]
    with open(path, "a") as fh:
        fh.writelines(broken[i % len(broken)] + "\n" for i in range(args.bad_rows))
    print(f"wrote {args.events + args.bad_rows:,} rows to {path}")


if __name__ == "__main__":
    main()
