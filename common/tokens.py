"""Behaviour tokens: what the model reads instead of raw events.

Item and category ids mean nothing across merchants, so no id reaches the model. Each window opens with
context tokens, its shape in coarse buckets (`CONTEXT`), then each event becomes one token built from
facts that mean the same in every shop:

    event type x time since the previous event (log buckets) x item novelty in the session
      x category novelty in the session x the item's popularity in this shop

A token id is the mixed-radix number of its fields, so it decodes back to words for explanations. The
vocabulary's version is a hash of this specification; it travels with every artifact, and a model is
never fed tokens of another version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedanom.common.events import EVENT_TYPES
from fedanom.common.sessions import SessionBatch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = range(len(SPECIAL_TOKENS))

GAP_EDGES_S = (0.3, 1.0, 3.0, 10.0, 30.0, 120.0, 600.0)
GAP_BUCKETS = ("first", *(f"<{e:g}s" for e in GAP_EDGES_S), f">={GAP_EDGES_S[-1]:g}s")
ITEM_NOVELTY = ("new item", "same item again", "item seen earlier")
CATEGORY_NOVELTY = ("no category", "new category", "same category", "category seen earlier")
# By the share of the shop's events that go to items at least this popular: the top items that make up
# the first 10% of events, then up to 50%, up to 90%, and the rest.
POPULARITY = ("unknown item", "rare item", "tail item", "head item", "top item")
POPULARITY_SHARES = (0.9, 0.5, 0.1)  # cumulative share thresholds for rare / tail / head; below: top

FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("event", EVENT_TYPES),
    ("gap", GAP_BUCKETS),
    ("item", ITEM_NOVELTY),
    ("category", CATEGORY_NOVELTY),
    ("popularity", POPULARITY),
)
RADICES = tuple(len(values) for _, values in FIELDS)
EVENT_TOKENS = int(np.prod(RADICES))

# Session context: the window's shape in coarse buckets, read right after <bos> and before its events.
# One token per measure (a session feature, common.features), bucket i holding values from edge i-1 up
# to edge i. The model learns how likely a window of this length, pace, regularity and item mix is in this
# shop, which a mean over events normalises away and human-paced bots betray.
CONTEXT: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("events", "n_events", (2, 3, 4, 6, 9, 14, 22, 35, 56, 90)),
    ("seconds", "duration_s", (1, 10, 30, 60, 180, 600, 1800, 3600)),
    ("events per minute", "events_per_min", (0.5, 1, 2, 4, 8, 15, 30, 60.5)),
    ("gap variation (CV)", "gap_cv", (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5)),
    ("share of distinct items", "unique_item_ratio", (0.2, 0.4, 0.6, 0.8, 1.0)),
    ("share of rare items", "frac_rare_items", (0.01, 0.25, 0.5, 0.75, 1.0)),
    ("categories", "n_categories", (1, 2, 3, 4, 6, 9, 14)),
)
CONTEXT_WIDTHS = tuple(len(edges) + 1 for _, _, edges in CONTEXT)
CONTEXT_START = len(SPECIAL_TOKENS) + EVENT_TOKENS  # the first context token's id
CONTEXT_OFFSETS = tuple(CONTEXT_START + int(sum(CONTEXT_WIDTHS[:k])) for k in range(len(CONTEXT)))
VOCAB_SIZE = CONTEXT_START + sum(CONTEXT_WIDTHS)

VOCAB_SPEC = {
    "specials": SPECIAL_TOKENS,
    "fields": {name: values for name, values in FIELDS},
    "gap_edges_s": GAP_EDGES_S,
    "popularity_shares": POPULARITY_SHARES,
    "context": [[name, feature, list(edges)] for name, feature, edges in CONTEXT],
}


def vocabulary_version() -> str:
    """Hash of the vocabulary specification: any change to fields, buckets or order changes it."""
    blob = json.dumps(VOCAB_SPEC, sort_keys=True).encode()
    return "bt2-" + hashlib.sha256(blob).hexdigest()[:12]


# Pinned: a test fails if the specification changes without this being updated deliberately.
VOCAB_VERSION = "bt2-fc6604f5e552"


@dataclass
class Popularity:
    """This shop's item popularity buckets, keyed by item hash. It stays on the merchant's machine.

    It keeps the event count per item, so traffic scored later can be added to it (`updated`): a shop's
    catalogue changes every day, and an item first seen in the scored traffic is bucketed by how often it
    appears there, as an item of the training period was, instead of as a token training never showed."""

    items: np.ndarray  # sorted uint64 item hashes
    counts: np.ndarray  # int64 events per item
    buckets: np.ndarray  # int8 popularity code per item (1 rare .. 4 top)
    _index: pd.Index | None = field(default=None, repr=False, compare=False)  # hash table for lookup

    @classmethod
    def from_counts(cls, items: np.ndarray, counts: np.ndarray) -> Popularity:
        """Bucket items by the event share of strictly more popular items; equal counts share a bucket."""
        order = np.argsort(-counts, kind="stable")
        sorted_counts = counts[order].astype(np.float64)
        total = sorted_counts.sum() or 1.0
        share_before = (np.cumsum(sorted_counts) - sorted_counts) / total
        tie_group_start = np.searchsorted(-sorted_counts, -sorted_counts, side="left")
        share_before = share_before[tie_group_start]
        bucket_sorted = 4 - np.searchsorted(np.array(POPULARITY_SHARES[::-1]), share_before, side="right")
        buckets = np.empty(len(items), dtype=np.int8)
        buckets[order] = bucket_sorted
        key_order = np.argsort(items)
        return cls(
            items=items[key_order], counts=counts[key_order].astype(np.int64), buckets=buckets[key_order]
        )

    def updated(self, later: Popularity) -> Popularity:
        """These counts plus those of later traffic, re-bucketed."""
        return Popularity.from_counts(*_summed([self.items, later.items], [self.counts, later.counts]))

    def lookup(self, items: np.ndarray) -> np.ndarray:
        """Popularity code per item; 0 (unknown) for items this shop has not seen."""
        if self._index is None:
            self._index = pd.Index(self.items)
        pos = self._index.get_indexer(items)  # type: ignore[arg-type]  # pandas takes arrays; stubs say Index
        return np.where(pos >= 0, self.buckets[pos], 0).astype(np.int8)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, items=self.items, counts=self.counts, version=VOCAB_VERSION)

    @classmethod
    def load(cls, path: str | Path) -> Popularity:
        with np.load(path) as data:
            return cls.from_counts(data["items"], data["counts"])


class ItemCounter:
    """Counts events per item hash over a stream, in memory proportional to the catalogue, not the log.
    With `max_items`, only that many of the most counted items are kept at each compaction: a stream of
    random item ids (a scraper's, an attacker's) cannot grow it without bound."""

    def __init__(self, max_items: int | None = None) -> None:
        self.max_items = max_items
        self._items: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self._compacted = 0

    def add(self, items: np.ndarray) -> None:
        keys, counts = np.unique(items, return_counts=True)
        self._items.append(keys)
        self._counts.append(counts)
        self._pending += len(keys)
        if self._pending > 4 * max(self._compacted, min(1 << 20, self.max_items or 1 << 20)):
            self._compact()

    def _compact(self) -> None:
        if len(self._items) > 1:
            keys, counts = _summed(self._items, self._counts)
            self._items, self._counts = [keys], [counts]
        if self.max_items is not None and self._items and len(self._items[0]) > self.max_items:
            keys, counts = self._items[0], self._counts[0]
            kept = np.sort(np.argpartition(-counts, self.max_items - 1)[: self.max_items])
            self._items, self._counts = [keys[kept]], [counts[kept]]
        self._compacted = self._pending = len(self._items[0]) if self._items else 0

    def popularity(self) -> Popularity:
        self._compact()
        if not self._items:
            return Popularity.from_counts(np.zeros(0, np.uint64), np.zeros(0, np.int64))
        return Popularity.from_counts(self._items[0], self._counts[0])


def _summed(items: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items and their summed counts over several (items, counts) pieces."""
    keys, inverse = np.unique(np.concatenate(items), return_inverse=True)
    return keys, np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)


def encode(batch: SessionBatch, popularity: Popularity) -> np.ndarray:
    """One behaviour token per event of the batch (int32, aligned with the batch's event arrays)."""
    gap = np.zeros(batch.n_events, dtype=np.int64)
    has_gap = batch.gap_ms >= 0
    gap[has_gap] = 1 + np.searchsorted(np.array(GAP_EDGES_S) * 1000.0, batch.gap_ms[has_gap], side="right")

    same_item = np.zeros(batch.n_events, dtype=bool)
    same_cat = np.zeros(batch.n_events, dtype=bool)
    continuing = batch.session_pos[1:] > 0
    same_item[1:] = continuing & (batch.item[1:] == batch.item[:-1])
    same_cat[1:] = continuing & (batch.cat[1:] == batch.cat[:-1])
    item = np.where(batch.item_first, 0, np.where(same_item, 1, 2))
    cat = np.where(batch.cat == 0, 0, np.where(batch.cat_first, 1, np.where(same_cat, 2, 3)))

    fields = (batch.etype.astype(np.int64), gap, item, cat, popularity.lookup(batch.item).astype(np.int64))
    token = np.zeros(batch.n_events, dtype=np.int64)
    for value, radix in zip(fields, RADICES, strict=True):
        token = token * radix + value
    return (token + len(SPECIAL_TOKENS)).astype(np.int32)


def encode_context(features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """The context tokens of each window ([n_windows, len(CONTEXT)] int32) from its session features."""
    columns = [
        offset
        + np.searchsorted(np.array(edges, dtype=np.float64), features[:, names.index(feature)], "right")
        for (_, feature, edges), offset in zip(CONTEXT, CONTEXT_OFFSETS, strict=True)
    ]
    return np.column_stack(columns).astype(np.int32)


def describe_context(token: int) -> str:
    """A context token in words, e.g. 'events 14 to under 22' or 'events per minute 60.5 and over'."""
    for (name, _, edges), offset, width in zip(CONTEXT, CONTEXT_OFFSETS, CONTEXT_WIDTHS, strict=True):
        if offset <= token < offset + width:
            return f"{name} {_bucket_words(edges, token - offset)}"
    raise ValueError(f"token {token} is not a context token")


def _bucket_words(edges: tuple[float, ...], k: int) -> str:
    if k == 0:
        return f"under {edges[0]:g}"
    if k == len(edges):
        return f"{edges[-1]:g} and over"
    return f"{edges[k - 1]:g} to under {edges[k]:g}"


def decode(token: int) -> dict[str, str]:
    """The words behind a token id."""
    if token < len(SPECIAL_TOKENS):
        return {"special": SPECIAL_TOKENS[token]}
    if token >= VOCAB_SIZE:
        raise ValueError(f"token {token} is outside the vocabulary of {VOCAB_SIZE}")
    if token >= CONTEXT_START:
        return {"context": describe_context(token)}
    rest = token - len(SPECIAL_TOKENS)
    values: dict[str, str] = {}
    for name, names in reversed(FIELDS):
        rest, code = divmod(rest, len(names))
        values[name] = names[code]
    return {name: values[name] for name, _ in FIELDS}


def describe(token: int) -> str:
    """One line of plain words, e.g. 'purchase <1s after the previous event, same item again, ...'."""
    parts = decode(token)
    if "special" in parts or "context" in parts:
        return parts.get("special") or parts["context"]
    gap = parts["gap"]
    when = "first event of the session" if gap == "first" else f"{gap} after the previous event"
    return f"{parts['event']} {when}, {parts['item']}, {parts['category']}, {parts['popularity']}"


def vocabulary_table() -> str:
    """The vocabulary as a Markdown table, for the README."""
    lines = ["| field | values |", "|---|---|"]
    lines += [f"| {name} | {', '.join(values)} |" for name, values in FIELDS]
    lines += [
        f"| context: {name} | {', '.join(_bucket_words(edges, k) for k in range(len(edges) + 1))} |"
        for name, _, edges in CONTEXT
    ]
    lines.append(f"| special | {', '.join(SPECIAL_TOKENS)} |")
    return "\n".join(lines)
