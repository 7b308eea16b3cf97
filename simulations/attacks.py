"""Attack injectors: labelled bot sessions added to a shop's normal traffic.

The registry follows the OWASP Automated Threats taxonomy, plus brushing (fake orders). Every threat
comes in a crude variant (script speed, obvious to rate features) and a human-mimicking one (human gaps,
human session lengths, a little normal-looking browsing), so that rate features alone cannot win.
Injected sessions belong to fresh user ids and carry their attack name in `attack`.

A bot can only be seen through what the shop logs. Each step is written as the shop's own event type
for it: a cart or a favourite in a shop that logs only views is a view, a checkout where only purchases
are logged is a purchase, and a login or a cart removal that the shop does not log leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedanom.common.events import standard_event

Gaps = Callable[[int], np.ndarray]
Steps = list[tuple[pd.DataFrame, str]]  # (items, standard event type), in order


@dataclass(frozen=True)
class Attack:
    name: str
    threat: str  # OWASP Automated Threat id, or "brushing"
    sessions: Callable[[np.random.Generator, ShopView], pd.DataFrame]  # one bot session, no user/time


class ShopView:
    """What a bot sees of a shop: its catalogue, its popular items, the event types it logs."""

    def __init__(self, rng: np.random.Generator, frame: pd.DataFrame) -> None:
        logged = frame.event_type.map(standard_event)
        self.logged = set(logged)
        self.rng, self.frame = rng, frame[(logged != "login").to_numpy()]  # items, not the login page
        self.catalogue = self.frame[["item_id", "category_id"]].drop_duplicates("item_id")
        self.browsing = str(self.frame.event_type.mode().iloc[0])

    def popular(self, n: int) -> pd.DataFrame:
        """n items drawn as shoppers draw them (by their share of the shop's events)."""
        return self.frame.iloc[self.rng.integers(0, len(self.frame), n)][["item_id", "category_id"]]

    def obscure(self, n: int) -> pd.DataFrame:
        """n distinct items drawn uniformly from the catalogue: mostly ones nobody looks at."""
        n = min(n, len(self.catalogue))
        return self.catalogue.iloc[self.rng.choice(len(self.catalogue), size=n, replace=False)]

    def hottest(self) -> pd.DataFrame:
        top = self.frame.item_id.value_counts().index[0]
        return self.catalogue[self.catalogue.item_id == top]

    def logged_as(self, kind: str) -> str | None:
        """The event the shop's log shows for a step of this standard type (None: no trace)."""
        if kind == "view":
            return self.browsing
        if kind in self.logged:
            return kind
        if kind in ("login", "remove_from_cart", "signup"):
            return None
        if kind == "checkout":
            return self.logged_as("purchase")
        return self.browsing

    def session(self, steps: Steps, gaps: Gaps) -> pd.DataFrame:
        """The steps as the shop logs them, each `gaps` apart; steps the log cannot see are dropped."""
        rows = []
        for items, kind in steps:
            event = self.logged_as(kind)
            if event is not None:
                columns = {"item_id": items.item_id.to_numpy(), "category_id": items.category_id.to_numpy()}
                rows.append(pd.DataFrame(columns).assign(event_type=event))
        out = pd.concat(rows, ignore_index=True)
        return out.assign(offset_s=np.cumsum(gaps(len(out))))


def _script(rng: np.random.Generator, period: float) -> Gaps:
    return lambda n: np.where(np.arange(n) == 0, 0.0, rng.uniform(0.8 * period, 1.2 * period, n))


def _human(rng: np.random.Generator, median_s: float = 20.0) -> Gaps:
    return lambda n: np.where(np.arange(n) == 0, 0.0, rng.lognormal(np.log(median_s), 0.9, n))


def _each(items: pd.DataFrame, *kinds: str) -> Steps:
    """Every item in turn, each through the given steps (view then cart, ...)."""
    return [(items.iloc[[k]], kind) for k in range(len(items)) for kind in kinds]


def _login_page(n: int) -> pd.DataFrame:
    return pd.DataFrame({"item_id": np.zeros(n, np.int64), "category_id": np.zeros(n, np.int64)})


def scraping(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-011: walk the catalogue, every event a new and mostly obscure item, never buying."""
    n = int(r.integers(40, 120) if crude else r.integers(6, 25))
    return s.session([(s.obscure(n), "view")], _script(r, 1.0) if crude else _human(r))


def click_fraud(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-016: click the same promoted item or two again and again, never buying."""
    n = int(r.integers(20, 60) if crude else r.integers(5, 15))
    targets = s.popular(2)
    return s.session([(targets.iloc[r.integers(0, 2, n)], "view")], _script(r, 2.0) if crude else _human(r))


def brushing(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """Fake orders: a seller's throwaway account buys its own obscure item to fake sales and reviews.
    Crude: view, cart, buy the item several times over at script speed. Mimic: browse a few popular
    items like a shopper, then find the item and buy it once."""
    target = s.obscure(1)
    if crude:
        return s.session(
            _each(pd.concat([target] * int(r.integers(2, 6))), "view", "cart", "purchase"), _script(r, 1.5)
        )
    return s.session(
        [
            (s.popular(int(r.integers(2, 6))), "view"),
            (target, "view"),
            (target, "cart"),
            (target, "purchase"),
        ],
        _human(r),
    )


def account_takeover(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-008: credential stuffing, then the taken-over account goes straight to buying.
    Crude: a burst of login attempts, then cart and buy at script speed. Mimic: one or two logins,
    then straight to cart and purchase at human speed, without the browsing a shopper does first."""
    goods = s.popular(int(r.integers(1, 4)))
    logins = _login_page(int(r.integers(10, 40) if crude else r.integers(1, 3)))
    steps = [(logins, "login"), *_each(goods, "cart"), (goods, "purchase")]
    return s.session(steps, _script(r, 0.5) if crude else _human(r, 10.0))


def cart_hoarding(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-021 denial of inventory: put stock in carts and never buy, so that real shoppers cannot.
    Crude: cart many sought-after items at script speed. Mimic: view then cart a handful, human gaps."""
    if crude:
        return s.session([(s.popular(int(r.integers(15, 40))), "cart")], _script(r, 1.0))
    return s.session(_each(s.popular(int(r.integers(4, 10))), "view", "cart"), _human(r))


def scalping(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-005: poll the hottest item until it can be bought, then buy within a second or two.
    Crude: poll every second. Mimic: poll a few times at human intervals; only the purchase is fast."""
    hot = s.hottest()
    polls = int(r.integers(20, 60) if crude else r.integers(4, 10))
    gaps = _script(r, 1.0) if crude else _human(r, 60.0)
    session = s.session([(pd.concat([hot] * polls), "view"), (hot, "cart"), (hot, "purchase")], gaps)
    fast = _script(r, 1.5)(3)[1:]
    session.loc[session.index[-2:], "offset_s"] = session.offset_s.iloc[-3] + np.cumsum(fast)
    return session


def carding(r: np.random.Generator, s: ShopView, crude: bool) -> pd.DataFrame:
    """OAT-001: test stolen card numbers with small orders, attempt after attempt.
    Crude: one cheap item in the cart, then a string of payment attempts at script speed. Mimic: a few
    different small orders, each carted and paid for, at human speed."""
    if crude:
        item = s.popular(1)
        return s.session(
            [(item, "cart"), (pd.concat([item] * int(r.integers(10, 30))), "checkout")], _script(r, 2.0)
        )
    return s.session(_each(s.popular(int(r.integers(3, 6))), "cart", "checkout"), _human(r))


def _registry() -> dict[str, Attack]:
    threats = [
        ("scraping", "OAT-011", scraping),
        ("click-fraud", "OAT-016", click_fraud),
        ("brushing", "brushing", brushing),
        ("account-takeover", "OAT-008", account_takeover),
        ("cart-hoarding", "OAT-021", cart_hoarding),
        ("scalping", "OAT-005", scalping),
        ("carding", "OAT-001", carding),
    ]
    attacks = {}
    for name, threat, build in threats:
        for variant, crude in (("crude", True), ("mimic", False)):
            attacks[f"{name}-{variant}"] = Attack(f"{name}-{variant}", threat, _variant(build, crude))
    return attacks


def _variant(
    build: Callable[[np.random.Generator, ShopView, bool], pd.DataFrame], crude: bool
) -> Callable[[np.random.Generator, ShopView], pd.DataFrame]:
    return lambda rng, shop: build(rng, shop, crude)


ATTACKS: dict[str, Attack] = _registry()


def inject(shop: pd.DataFrame, attacks: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """The shop's events plus `attacks[name]` bot sessions of each kind, spread over time like its traffic.

    Returns the Taobao-layout columns plus `attack` ("" for normal traffic), sorted by time.
    """
    rng = np.random.default_rng(seed)
    # bots arrive as the shop's traffic does: each starts at the time of a random logged event (a uniform
    # draw over the span put most bots into a quiet stretch of a sample whose traffic is bunched up)
    times = shop.timestamp.to_numpy()
    next_user = int(shop.user_id.max()) + 1_000_000
    frames = [shop.assign(attack="")]
    view = ShopView(rng, shop)
    for name, count in attacks.items():
        attack = ATTACKS[name]
        for _ in range(count):
            session = attack.sessions(rng, view)
            offsets = session.pop("offset_s").to_numpy()
            session["timestamp"] = (int(times[rng.integers(0, len(times))]) + offsets).astype(np.int64)
            frames.append(session.assign(user_id=next_user, attack=name))
            next_user += 1
    out = pd.concat(frames, ignore_index=True)
    return out[[*shop.columns, "attack"]].sort_values("timestamp", kind="stable", ignore_index=True)
