"""What `fedanom serve` shows at /metrics (Prometheus): traffic, latency, sessions, the model in force."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedanom.common.detector.live import LiveSessions, LoadedDetector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """What /metrics shows; events per second is the rate of `fedanom_serve_events_total`."""

    def __init__(self, live: LiveSessions, model: Callable[[], LoadedDetector]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("fedanom_serve_events", "Events scored.", registry=r)
        self.rejected = Counter("fedanom_serve_events_rejected", "Events rejected as malformed.", registry=r)
        self.latency = Histogram(
            "fedanom_serve_event_latency_seconds",
            "Time from a request's arrival to its answer, once per event in it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.flags = Counter("fedanom_serve_flagged_events", "Events whose running score passed.", registry=r)
        self.ended = Counter("fedanom_serve_sessions_ended", "Sessions ended, by how.", ["how"], registry=r)
        self.ended_flagged = Counter(
            "fedanom_serve_sessions_flagged", "Ended sessions whose final score passed.", registry=r
        )
        self.reloads = Counter("fedanom_serve_reloads", "Detectors loaded after the first.", registry=r)
        Gauge("fedanom_serve_open_sessions", "Sessions open now.", registry=r).set_function(
            lambda: len(live.sessions)
        )
        Gauge("fedanom_serve_open_session_bytes", "Memory the open sessions hold.", registry=r).set_function(
            lambda: live.held_bytes
        )
        Gauge("fedanom_serve_evictions", "Open sessions dropped at the memory cap.", registry=r).set_function(
            lambda: live.evicted
        )
        Gauge("fedanom_serve_threshold", "The flag threshold in force.", registry=r).set_function(
            lambda: live.threshold(model())
        )
        Gauge("fedanom_serve_model_age_seconds", "Since the detector was loaded.", registry=r).set_function(
            lambda: time.time() - model().loaded_at
        )
        self.model_info = Gauge("fedanom_serve_model", "The detector in force (1).", ["hash"], registry=r)
