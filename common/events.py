"""The event contract: canonical fields and the standard event types every merchant's export maps onto.

Item and category ids differ between merchants and never reach the model; event *types* must mean the same
thing everywhere, so every export's vocabulary is mapped onto the small standard set below.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedanom.common.errors import FedanomError

REQUIRED_FIELDS = ("user_id", "timestamp", "event_type", "item_id")
OPTIONAL_FIELDS = ("session_id", "category", "price")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

# The standard event types, in token order. Appending is a vocabulary change (the version hash moves).
EVENT_TYPES: tuple[str, ...] = (
    "view",  # item or page view
    "click",  # click on an item, ad or link
    "search",  # search query
    "cart",  # add to cart
    "remove_from_cart",
    "fav",  # favourite / wishlist
    "checkout",  # checkout started, payment attempted
    "purchase",  # order placed / transaction
    "login",
    "logout",
    "signup",
    "other",  # a merchant-declared custom type with no standard equivalent
)
EVENT_CODE = {name: code for code, name in enumerate(EVENT_TYPES)}

# Spellings seen in real exports (Taobao, REES46, RetailRocket, GA-style logs), accepted everywhere.
STANDARD_ALIASES: dict[str, str] = {
    **{name: name for name in EVENT_TYPES},
    "pv": "view",
    "pageview": "view",
    "page_view": "view",
    "detail": "view",
    "impression": "view",
    "addtocart": "cart",
    "add_to_cart": "cart",
    "add-to-cart": "cart",
    "removefromcart": "remove_from_cart",
    "remove-from-cart": "remove_from_cart",
    "favorite": "fav",
    "favourite": "fav",
    "wishlist": "fav",
    "begin_checkout": "checkout",
    "payment": "checkout",
    "buy": "purchase",
    "order": "purchase",
    "transaction": "purchase",
    "signin": "login",
    "sign_in": "login",
    "register": "signup",
}


def standard_event(raw: str) -> str:
    """The standard name of a raw event type ("pv" -> "view"); unknown names come back lower-cased."""
    name = str(raw).lower()
    return STANDARD_ALIASES.get(name, name)


def event_type_map(custom: Iterable[str] = ()) -> dict[str, int]:
    """Lower-cased raw event name -> standard event code, with the merchant's custom declarations added.

    A declaration is `name=standard` (an alias, e.g. `addbasket=cart`) or a bare `name`, which maps to
    `other`: the event is kept and tokenized, but carries no more meaning than "some custom action".
    """
    mapping = {raw: EVENT_CODE[std] for raw, std in STANDARD_ALIASES.items()}
    for declaration in custom:
        raw, _, std = declaration.partition("=")
        raw, std = raw.strip().lower(), (std.strip().lower() or "other")
        if not raw:
            raise FedanomError(f"custom event type '{declaration}' has no name; write NAME or NAME=STANDARD")
        if std not in EVENT_CODE:
            raise FedanomError(
                f"custom event type '{declaration}' maps to '{std}', which is not a standard type "
                f"({', '.join(EVENT_TYPES)})"
            )
        mapping[raw] = EVENT_CODE[std]
    return mapping
