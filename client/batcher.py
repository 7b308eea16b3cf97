"""The scoring thread of `fedanom serve`: requests that arrive during a pass share the next one.

The open sessions are touched by one thread, one pass at a time, so they need no lock, while the event
loop keeps reading requests. A pass's fixed cost (the isolation forest's trees, one call of the model)
is then paid once for every request that waited. A pass that fails has put back everything it changed
(`LiveSessions.add`), and its requests are scored one by one, so a failing request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio

from fedanom.common.detector.live import LiveSessions, Scored

MAX_WAITING_EVENTS = 100_000  # beyond this the service is behind by half a minute: new requests get 503

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


Answer = tuple[list[tuple[int, Scored]], list[dict[str, Any]], list[tuple[int, Scored]]]


class Batcher:
    """One scoring thread for the open sessions; the requests that wait for it share its next pass."""

    def __init__(self, live: LiveSessions) -> None:
        self.live = live
        self.waiting: list[tuple[list[Any], asyncio.Future[Answer]]] = []
        self.wake = asyncio.Event()
        self.one_at_a_time = anyio.CapacityLimiter(1)

    async def add(self, records: list[Any]) -> Answer:
        waiting = sum(len(r) for r, _ in self.waiting)
        if waiting + len(records) > MAX_WAITING_EVENTS:
            raise RequestError(503, f"the service is behind ({waiting:,} events wait): send again shortly")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting.append((records, future))
        self.wake.set()
        return await future

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work` on the open sessions, in the scoring thread, after the pass before it."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self.one_at_a_time)

    async def serve_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            try:
                answer: Answer = await self.run(self.live.add, [r for records, _ in batch for r in records])
            except Exception:  # the pass left nothing behind: each request is scored alone, so that one
                log.exception("a scoring pass failed; its requests are scored one by one")  # fails alone
                for records, future in batch:
                    try:
                        _settle(future, await self.run(self.live.add, records))
                    except Exception as exc:
                        _settle(future, exc)
                continue
            start = 0
            for records, future in batch:
                _settle(future, _part(answer, start, start + len(records)))
                start += len(records)


def _settle(future: asyncio.Future[Answer], outcome: Answer | Exception) -> None:
    if future.done():  # a request whose client went away
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _part(answer: Answer, start: int, stop: int) -> Answer:
    """The answers to one request's events (positions start..stop of the pass), renumbered from 0."""
    events, rejected, finals = answer
    return (
        [(i - start, a) for i, a in events if start <= i < stop],
        [{**r, "index": r["index"] - start} for r in rejected if start <= r["index"] < stop],
        [(i - start, f) for i, f in finals if start <= i < stop],
    )
