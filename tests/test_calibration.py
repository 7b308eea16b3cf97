"""The synthetic shoppers are calibrated to the real samples: the targets are what the real samples say,
and the shop generator's defaults land near them. Attacks are written in each shop's own vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedanom.common.events import standard_event
from fedanom.simulations.attacks import ATTACKS, inject
from fedanom.simulations.calibration import TARGETS, behaviour_stats, derive_targets, real_sample_stats
from fedanom.simulations.real import real_shop
from fedanom.simulations.shop import ShopConfig, generate_shop


def test_targets_are_what_the_real_samples_measure(shared_data: Path) -> None:
    assert derive_targets(real_sample_stats(shared_data)) == TARGETS


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_defaults_land_near_the_targets(seed: int) -> None:
    synthetic = behaviour_stats(
        generate_shop(ShopConfig(n_events=30_000, n_users=3_000, n_items=8_000), seed)
    )
    for stat, target in TARGETS.items():
        # within a quarter of the target (or 0.01 absolute for the small shares)
        assert abs(synthetic[stat] - target) <= max(0.25 * target, 0.01), (stat, synthetic[stat], target)


def test_no_user_owns_a_share_of_the_shop() -> None:
    shop = generate_shop(ShopConfig(n_events=30_000, n_users=3_000, n_items=8_000), seed=0)
    assert shop.user_id.value_counts().iloc[0] / len(shop) < 0.02  # the Zipf users gave one user 5%


def test_every_attack_is_labelled_and_spread_over_the_shop() -> None:
    shop = generate_shop(ShopConfig(n_events=10_000, n_users=1_000, n_items=3_000, p_login=0.2), seed=0)
    events = inject(shop, dict.fromkeys(ATTACKS, 3), seed=1)
    bots = events[events.attack != ""]
    assert len(events) == len(shop) + len(bots)
    assert set(bots.attack) == set(ATTACKS)
    assert all(n == 3 for n in bots.groupby("attack").user_id.nunique())
    assert bots.timestamp.min() >= shop.timestamp.min() and bots.timestamp.max() > np.median(shop.timestamp)
    crude_logins = bots[bots.attack == "account-takeover-crude"].event_type.eq("login").sum()
    assert crude_logins >= 3 * 10  # a burst of logins where the shop logs logins
    assert not ((bots.item_id == 0) & (bots.event_type != "login")).any()  # nobody carts the login page


def test_attacks_use_only_what_the_shop_logs(shared_data: Path) -> None:
    """YOOCHOOSE logs clicks only: every bot step is a click there, logins leave no trace."""
    shop = real_shop(
        shared_data / "yoochoose-rsc15-100k" / "yoochoose-clicks-100k_train_full.tsv.gz", "yoochoose"
    )
    bots = inject(shop, dict.fromkeys(ATTACKS, 2), seed=1).query("attack != ''")
    assert set(bots.event_type.map(standard_event)) == {"click"}
    assert set(bots.attack) == set(ATTACKS)
