"""A small Python client for `fedanom serve`: send a shop's live events, read back their scores.

    from fedanom.client.stream import EventStream
    with EventStream("http://127.0.0.1:8080", api_key="...") as stream:
        answer = stream.send([{"user_id": "u1", "timestamp": "2026-12-02T10:00:00Z",
                               "event_type": "view", "item_id": "sku-9"}])
        for event in answer["events"]:
            if event["flagged"]:
                ...  # hold the checkout, ask for a second factor
        final = stream.end(answer["events"][0]["session_id"])

Events go as NDJSON in the column names the service was started with (its preset or --map). A request
the service refuses (a wrong key, a body over its cap) raises `StreamError` with its reason; events it
rejects come back in the answer's `rejected` list, each with its position, field and reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx


class StreamError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


class EventStream:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def send(self, events: Iterable[Any]) -> dict[str, Any]:
        """Score these events: {"events": [...], "rejected": [...], "ended": [...]}."""
        body = "".join(json.dumps(event) + "\n" for event in events)
        response = self.http.post(
            "/events", content=body.encode(), headers={"Content-Type": "application/x-ndjson"}
        )
        return self._answer(response, accept=(200, 422))

    def end(self, session_id: str) -> dict[str, Any]:
        """The session's final score; the service forgets it."""
        return self._answer(self.http.post(f"/sessions/{quote(session_id, safe='')}/end"))

    def session(self, session_id: str) -> dict[str, Any]:
        """A recently ended session's final answer, with how it ended; or an open one's event count."""
        return self._answer(self.http.get(f"/sessions/{quote(session_id, safe='')}"))

    def reload(self) -> str:
        """Ask the service to load its detector again; the hash of the one now in force."""
        return str(self._answer(self.http.post("/admin/reload"))["model"])

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _answer(response: httpx.Response, accept: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:200]}
        if response.status_code not in accept:
            raise StreamError(response.status_code, str(body.get("error", body)))
        return dict(body)
