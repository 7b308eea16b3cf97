"""Presets: how a real shop's export maps onto the event contract.

A preset names the source column for each canonical field, how timestamps are written, and the quirks of
that export (no header, tab separator, a log with no event-type column). `--map` builds the same thing for
any other export, so every reader downstream sees one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fedanom.common.errors import FedanomError
from fedanom.common.events import ALL_FIELDS, EVENT_TYPES, REQUIRED_FIELDS

# Timestamp encodings: Unix seconds or milliseconds, a strptime format, `auto` (ISO 8601 text or Unix
# seconds/milliseconds told apart by magnitude), or `date+offset_ms` (DIGINETICA: a day plus the
# milliseconds since the session's first event, in the column named by `timestamp_offset`).
TIMESTAMP_FORMATS = ("auto", "unix_s", "unix_ms", "date+offset_ms")


@dataclass(frozen=True)
class Preset:
    """One export format. `columns` maps canonical field -> source column name."""

    name: str
    columns: dict[str, str]
    timestamp_format: str = "auto"
    sep: str = ","
    header: bool = True
    # Column names for a headerless file, in file order.
    column_names: tuple[str, ...] = ()
    # A log with no event-type column (click logs): every row has this standard type.
    constant_event_type: str | None = None
    # Where user_id is missing (anonymous visitors), take this canonical field instead.
    user_id_fallback: str | None = None
    timestamp_offset: str | None = None
    # The generic default names every field after itself; optional fields absent from the file are skipped.
    optional_may_be_absent: bool = False
    description: str = ""
    extra_event_types: tuple[str, ...] = field(default=())

    def for_columns(self, names: list[str]) -> Preset:
        """This preset for a file with these columns: optional fields it may skip are dropped if absent."""
        if not self.optional_may_be_absent:
            return self
        keep = {f: c for f, c in self.columns.items() if f in REQUIRED_FIELDS or c in names}
        return replace(self, columns=keep)

    def source_columns(self) -> list[str]:
        """Every source column this preset reads."""
        cols = list(dict.fromkeys(self.columns.values()))
        if self.timestamp_offset:
            cols.append(self.timestamp_offset)
        return cols


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="taobao",
            description="Tianchi/Taobao UserBehavior: headerless user,item,category,pv/buy/cart/fav,unix s",
            columns={
                "user_id": "user_id",
                "item_id": "item_id",
                "category": "category_id",
                "event_type": "behavior_type",
                "timestamp": "timestamp",
            },
            column_names=("user_id", "item_id", "category_id", "behavior_type", "timestamp"),
            header=False,
            timestamp_format="unix_s",
        ),
        Preset(
            name="rees46",
            description="REES46 multi-category store: event_time UTC, view/cart/remove_from_cart/purchase",
            columns={
                "timestamp": "event_time",
                "event_type": "event_type",
                "item_id": "product_id",
                "category": "category_id",
                "price": "price",
                "user_id": "user_id",
                "session_id": "user_session",
            },
            timestamp_format="%Y-%m-%d %H:%M:%S UTC",
        ),
        Preset(
            name="yoochoose",
            description="YOOCHOOSE / RecSys 2015 clicks (session-rec TSV): SessionId, ItemId, Time (unix s)",
            columns={
                "session_id": "SessionId",
                "user_id": "SessionId",
                "item_id": "ItemId",
                "timestamp": "Time",
            },
            sep="\t",
            timestamp_format="unix_s",
            constant_event_type="click",
        ),
        Preset(
            name="diginetica",
            description="DIGINETICA (CIKM Cup 2016) item views: ';'-separated, eventdate + timeframe ms",
            columns={
                "session_id": "session_id",
                "user_id": "user_id",
                "item_id": "item_id",
                "timestamp": "eventdate",
            },
            sep=";",
            timestamp_format="date+offset_ms",
            timestamp_offset="timeframe",
            constant_event_type="view",
            user_id_fallback="session_id",
        ),
        Preset(
            name="retailrocket",
            description="RetailRocket events.csv: timestamp ms, visitorid, view/addtocart/transaction",
            columns={
                "timestamp": "timestamp",
                "user_id": "visitorid",
                "event_type": "event",
                "item_id": "itemid",
            },
            timestamp_format="unix_ms",
        ),
        Preset(
            name="talkingdata",
            description="TalkingData AdTracking: ad clicks; ip as user, app as item, channel as category",
            columns={"user_id": "ip", "item_id": "app", "category": "channel", "timestamp": "click_time"},
            timestamp_format="%Y-%m-%d %H:%M:%S",
            constant_event_type="click",
        ),
    ]
}


def parse_mapping(text: str) -> dict[str, str]:
    """`user_id=visitorid,timestamp=ts,...` -> {canonical: source column}."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise FedanomError(f"--map entry '{part}' must look like FIELD=COLUMN, e.g. user_id=visitorid")
        if key not in ALL_FIELDS:
            raise FedanomError(f"--map names unknown field '{key}'; the fields are {', '.join(ALL_FIELDS)}")
        mapping[key] = value
    return mapping


def resolve_preset(
    name: str | None,
    *,
    mapping: str | None = None,
    sep: str | None = None,
    timestamp_format: str | None = None,
    event_types: tuple[str, ...] = (),
) -> Preset:
    """The preset to read with: a named one, or the generic one built from `--map`, with overrides applied.

    In a mapping, `event_type=const:view` declares a log whose rows are all of one standard type.
    """
    if name is not None:
        if name not in PRESETS:
            raise FedanomError(
                f"unknown preset '{name}'; the presets are {', '.join(PRESETS)} (or use --map)"
            )
        preset = PRESETS[name]
        if mapping:
            preset = replace(preset, columns={**preset.columns, **parse_mapping(mapping)})
    else:
        columns = parse_mapping(mapping) if mapping else {f: f for f in ALL_FIELDS}
        preset = Preset(
            name="generic",
            columns=columns,
            description="generic column mapping",
            optional_may_be_absent=not mapping,
        )
    constant = preset.constant_event_type
    event_col = preset.columns.get("event_type", "")
    if event_col.startswith("const:"):
        constant = event_col.removeprefix("const:")
        preset = replace(preset, columns={k: v for k, v in preset.columns.items() if k != "event_type"})
    if constant is not None and constant not in EVENT_TYPES:
        raise FedanomError(
            f"constant event type '{constant}' is not a standard type ({', '.join(EVENT_TYPES)})"
        )
    fmt = timestamp_format or preset.timestamp_format
    if fmt not in TIMESTAMP_FORMATS and "%" not in fmt:
        raise FedanomError(
            f"timestamp format '{fmt}' is not one of {', '.join(TIMESTAMP_FORMATS)} nor a strptime pattern"
        )
    preset = replace(
        preset,
        constant_event_type=constant,
        sep=sep if sep is not None else preset.sep,
        timestamp_format=fmt,
        extra_event_types=preset.extra_event_types + tuple(event_types),
    )
    missing = [f for f in REQUIRED_FIELDS if f not in preset.columns and not (f == "event_type" and constant)]
    if missing:
        raise FedanomError(
            f"the column mapping does not say which column holds {', '.join(missing)}; add --map"
        )
    return preset
