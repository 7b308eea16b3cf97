"""How close synthetic shoppers are to real ones: the behaviour statistics both are measured on.

`TARGETS` were measured on the real samples in ../shared/data (`python -m fedanom.simulations.calibration
../shared/data` prints every shop's statistics and the targets derived from them); the shop generator's
defaults (simulations.shop) are tuned to them, and a test re-measures both. Which shop informs which
target, because no single sample shows everything:

- session length, gaps, item revisits: the median over the shops that log real session ids (REES46,
  DIGINETICA, YOOCHOOSE). Taobao's sample is a two-hour window without session ids, which cuts its
  sessions short (68% single events).
- event mix and funnel: the mean over the shops that log carts and purchases (Taobao, REES46).

Sessions are cut the way fedanom cuts them: a user's events, ended by 30 minutes of inactivity.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedanom.common.events import standard_event
from fedanom.common.sessions import SessionConfig
from fedanom.simulations.real import real_shop
from fedanom.simulations.shop import ShopConfig, generate_shop

STATS: dict[str, str] = {
    "browse_share": "share of events that are views or clicks",
    "cart_share": "share of events that are add-to-cart",
    "fav_share": "share of events that are favourites",
    "purchase_share": "share of events that are purchases",
    "login_share": "share of events that are logins",
    "session_events_mean": "events per session, mean",
    "session_events_p90": "events per session, 90th percentile",
    "single_event_sessions": "share of sessions with one event",
    "gap_median_s": "seconds between a session's events, median",
    "gap_p90_s": "seconds between a session's events, 90th percentile",
    "sessions_with_cart": "share of sessions that add to cart",
    "sessions_with_purchase": "share of sessions that purchase",
    "item_revisits": "share of events on an item already seen in the session",
}
SESSION_SHAPE = (
    "session_events_mean",
    "session_events_p90",
    "single_event_sessions",
    "gap_median_s",
    "gap_p90_s",
    "item_revisits",
)
SESSION_GAP_S = SessionConfig().gap_minutes * 60

# (directory under ../shared/data, file, preset, logs session ids, logs carts and purchases)
REAL_SAMPLES = (
    ("taobao-userbehavior", "UserBehavior_2017-11-26_window.csv.gz", "taobao", False, True),
    ("rees46-multicategory", "2019-Oct_sample_ibrhmspl.csv.gz", "rees46", True, True),
    ("diginetica-sample", "sample_train-item-views.csv.gz", "diginetica", True, False),
    ("yoochoose-rsc15-100k", "yoochoose-clicks-100k_train_full.tsv.gz", "yoochoose", True, False),
)

TARGETS: dict[str, float] = {
    "browse_share": 0.935,
    "cart_share": 0.032,
    "fav_share": 0.015,
    "purchase_share": 0.017,
    "login_share": 0.0,
    "session_events_mean": 3.843,
    "session_events_p90": 8.0,
    "single_event_sessions": 0.312,
    "gap_median_s": 50.0,
    "gap_p90_s": 233.0,
    "sessions_with_cart": 0.052,
    "sessions_with_purchase": 0.037,
    "item_revisits": 0.264,
}


def behaviour_stats(frame: pd.DataFrame) -> dict[str, float]:
    """The STATS of a shop's events (columns user_id, item_id, event_type, timestamp in s)."""
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    kind = frame.event_type.map(standard_event).to_numpy()
    user, time = frame.user_id.to_numpy(), frame.timestamp.to_numpy()
    new = np.ones(len(frame), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (time[1:] - time[:-1] > SESSION_GAP_S)
    session = np.cumsum(new)
    lengths = np.bincount(session)[1:]
    gaps = (time[1:] - time[:-1])[~new[1:]]
    events = pd.DataFrame({"session": session, "kind": kind, "item": frame.item_id.to_numpy()})

    def sessions_with(k: str) -> float:
        return float(events.session[events.kind == k].nunique() / len(lengths))

    return {
        "browse_share": float(np.isin(kind, ["view", "click"]).mean()),
        "cart_share": float((kind == "cart").mean()),
        "fav_share": float((kind == "fav").mean()),
        "purchase_share": float((kind == "purchase").mean()),
        "login_share": float((kind == "login").mean()),
        "session_events_mean": float(lengths.mean()),
        "session_events_p90": float(np.quantile(lengths, 0.9)),
        "single_event_sessions": float((lengths == 1).mean()),
        "gap_median_s": float(np.median(gaps)) if len(gaps) else float("nan"),
        "gap_p90_s": float(np.quantile(gaps, 0.9)) if len(gaps) else float("nan"),
        "sessions_with_cart": sessions_with("cart"),
        "sessions_with_purchase": sessions_with("purchase"),
        "item_revisits": float(events.duplicated(["session", "item"]).mean()),
    }


def real_sample_stats(data_dir: Path) -> dict[str, dict[str, float]]:
    return {
        preset: behaviour_stats(real_shop(data_dir / folder / name, preset))
        for folder, name, preset, _, _ in REAL_SAMPLES
    }


def derive_targets(per_shop: dict[str, dict[str, float]]) -> dict[str, float]:
    """The rule in the module docstring, applied to real_sample_stats' result."""
    with_sessions = [per_shop[p] for _, _, p, sessions, _ in REAL_SAMPLES if sessions]
    with_funnel = [per_shop[p] for _, _, p, _, funnel in REAL_SAMPLES if funnel]
    return {
        stat: round(
            float(np.median([s[stat] for s in with_sessions]))
            if stat in SESSION_SHAPE
            else float(np.mean([s[stat] for s in with_funnel])),
            3,
        )
        for stat in STATS
    }


def calibration_table(columns: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one statistic per row, one column per shop (the targets first)."""
    names = ["real samples (target)", *columns]
    lines = ["| statistic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for stat, meaning in STATS.items():
        values = [TARGETS[stat], *(c[stat] for c in columns.values())]
        lines.append(f"| {meaning} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m fedanom.simulations.calibration DATA_DIR`: every real sample's statistics, the
    targets they give, and the synthetic shop's (default generator) next to them."""
    data_dir = Path((argv or sys.argv[1:])[0])
    per_shop = real_sample_stats(data_dir)
    synthetic = behaviour_stats(generate_shop(ShopConfig(n_events=30_000, n_users=3_000, n_items=8_000)))
    table = pd.DataFrame({**per_shop, "derived targets": derive_targets(per_shop), "synthetic": synthetic})
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
