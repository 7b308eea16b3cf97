"""The detector in one place: the model, its DP training, the privacy ledger, scoring, the artifact and
`BehaviourDetector`, the PyOD-shaped face the commands, the Flower apps and the simulation share, and
`score_events`, a table of scored sessions from a DataFrame of events (`scores`).

This is the torch stack, kept apart from the torch-free data pipeline in `fedanom.common`, so a process
that only reads data or answers a query never imports torch. `BehaviourDetector` and `score_events` are
importable from here and are loaded on first use (PEP 562), so importing one module of the package does
not load the others.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "BehaviourDetector":
        from fedanom.common.detector.detector import BehaviourDetector

        return BehaviourDetector
    if name == "score_events":
        from fedanom.common.detector.scores import score_events

        return score_events
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
