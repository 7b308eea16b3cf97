"""From per-event surprise to session scores and plain-words explanations.

`event_surprise` runs the model over windows in length-bucketed batches (little padding, no gradients)
and returns each event's NLL, the NLL of `<eos>` where a session ends and that of each context token.
A window's sequence score is its context's NLL plus an aggregate of its events' (higher = more
anomalous); which aggregate is chosen on validation data and recorded in the detector. Summing the
context keeps the evidence a mean over events normalises away: how long, how fast, how regular the
session is. `explain` turns the most surprising parts back into words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from fedanom.common.detector.model import forward, pad_batch
from fedanom.common.detector.reference import FeatureReference
from fedanom.common.tokens import CONTEXT, decode, describe_context
from fedanom.common.windows import Windows


@dataclass
class Surprise:
    """NLL (nats) of every event (aligned with `Windows.tokens`), of each window's <eos> (NaN if none)
    and of each window's context tokens; the supervised head's logit per window when the model has one."""

    event: np.ndarray
    end: np.ndarray
    context: np.ndarray  # [n_windows, len(tokens.CONTEXT)]
    head: np.ndarray | None = None


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Window indices grouped by similar length, each group padded to at most `max_tokens` tokens."""
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    current: list[int] = []
    width = 0
    for i in order:
        width_if_added = max(width, int(lengths[i]))
        if current and width_if_added * (len(current) + 1) > max_tokens:
            groups.append(np.array(current))
            current, width_if_added = [], int(lengths[i])
        current.append(i)
        width = width_if_added
    if current:
        groups.append(np.array(current))
    return groups


@torch.inference_mode()
def event_surprise(
    model: torch.nn.Module, windows: Windows, *, device: torch.device | str = "cpu", max_tokens: int = 2048
) -> Surprise:
    if model.training:  # eval() walks every module: 1.5 ms a call, most of a small live request's model time
        model.eval()
    event = np.zeros(len(windows.tokens), dtype=np.float32)
    end = np.full(windows.n_windows, np.nan, dtype=np.float32)
    k = len(CONTEXT)
    context = np.zeros((windows.n_windows, k), dtype=np.float32)
    head = None
    for group in length_batches(windows.framed_lengths, max_tokens):
        ids, mask = pad_batch([windows.framed(i) for i in group], device)
        nll_t, logit = forward(model, ids, mask)
        nll = nll_t.float().cpu().numpy()
        if logit is not None:
            head = np.zeros(windows.n_windows, dtype=np.float32) if head is None else head
            head[group] = logit.cpu().numpy()
        context[group] = nll[:, :k]
        for row, i in enumerate(group):
            n = windows.offsets[i + 1] - windows.offsets[i]
            event[windows.offsets[i] : windows.offsets[i + 1]] = nll[row, k : k + n]
            if windows.closes_session[i]:
                end[i] = nll[row, k + n]
    return Surprise(event=event, end=end, context=context, head=head)


def _per_window(surprise: Surprise, windows: Windows) -> list[np.ndarray]:
    out = []
    for i in range(windows.n_windows):
        values = surprise.event[windows.offsets[i] : windows.offsets[i + 1]]
        out.append(values if np.isnan(surprise.end[i]) else np.append(values, surprise.end[i]))
    return out


def _top_mean(k: int) -> Callable[[np.ndarray], float]:
    return lambda v: float(np.sort(v)[-k:].mean())


# Candidate session scores over a window's event NLLs (and its <eos>); higher = more anomalous.
# Chosen in benchmarks/detector.py on the seeded shop with injected bots: best or tied-best validation
# AUPRC of the four candidates and best test AUPRC for both architectures (BENCHMARKS.md). Used when a
# merchant has no labels to choose with.
DEFAULT_AGGREGATION = "mean"
AGGREGATIONS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda v: float(v.mean()),
    "max": lambda v: float(v.max()),
    "top3": _top_mean(3),
    "top5": _top_mean(5),
}


def aggregate(surprise: Surprise, windows: Windows, how: str) -> np.ndarray:
    """The sequence score per window: the surprise of its context (the joint NLL of its length, pace,
    regularity and item mix) plus the aggregated surprise of its events."""
    combine = AGGREGATIONS[how]
    events = np.array([combine(v) for v in _per_window(surprise, windows)], dtype=np.float64)
    return surprise.context.sum(1, dtype=np.float64) + events


def choose_aggregation(surprise: Surprise, windows: Windows, labels: np.ndarray | None) -> str:
    """The aggregation whose sequence score ranks the windows' known attacks best (AUPRC); without labels
    of both kinds, DEFAULT_AGGREGATION."""
    if labels is None or labels.min() == labels.max():
        return DEFAULT_AGGREGATION
    scores = {how: average_precision_score(labels, aggregate(surprise, windows, how)) for how in AGGREGATIONS}
    return max(scores, key=lambda how: scores[how])


def explain(
    surprise: Surprise,
    windows: Windows,
    i: int,
    k: int = 3,
    reference: FeatureReference | None = None,
    where: str = "line",
) -> list[str]:
    """The k most surprising things about window i, in plain words: its events (the session's end counts
    as one), its context and, with the shop's feature reference, its most unusual session features. An
    event is named by its `where` and `windows.line`: the line of its file, or (live) its place in its
    session."""
    lo, hi = windows.offsets[i], windows.offsets[i + 1]
    candidates = [
        (float(nll), f"{describe_context(int(token))}: 1-in-{np.exp(nll):,.0f} under this shop's model")
        for nll, token in zip(surprise.context[i], windows.context[i], strict=True)
    ]
    candidates += [
        (float(surprise.event[e]), event_words(surprise.event[e], windows, e, where)) for e in range(lo, hi)
    ]
    if not np.isnan(surprise.end[i]):
        end = float(surprise.end[i])
        candidates.append((end, f"the session ends here: 1-in-{np.exp(end):,.0f} under this shop's model"))
    if reference is not None:
        candidates += reference.describe(windows.features[i])
    candidates.sort(key=lambda c: -c[0])
    return [words for _, words in candidates[:k]]


def event_words(nll: float, windows: Windows, e: int, where: str = "line") -> str:
    """Event e and how surprising the model found it (`nll`), in words."""
    return f"{_describe_event(windows, e, where)}: 1-in-{np.exp(nll):,.0f} under this shop's model"


def _describe_event(windows: Windows, e: int, where: str) -> str:
    fields = decode(int(windows.tokens[e]))
    gap = windows.gap_ms[e]
    when = "first event of the session" if gap < 0 else f"{_seconds(gap / 1000)} after the previous event"
    return f"{where} {windows.line[e]}: {fields['event']} {when} ({fields['item']}, {fields['popularity']})"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
