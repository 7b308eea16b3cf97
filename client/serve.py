"""`fedanom serve`: a merchant's live traffic scored event by event over HTTP (Starlette on uvicorn).

    POST /events               one event (JSON object), a batch (JSON array) or a stream (NDJSON)
    POST /sessions/{id}/end    the session's final score; its memory is freed
    GET  /sessions/{id}        a recently ended session's final (also one ended idle), or an open one's size
    POST /admin/reload         load the detector again (also done on its own when the federation leaves
                               a new one in --state-dir)
    GET  /healthz              no key needed
    GET  /metrics              Prometheus text

Events come in the merchant's own column names, read through the same preset or --map as its exports and
checked as a file's rows are (`common.loader`); sessions are kept and scored by `common.detector.live`.
Everything that arrives is untrusted: a body over the size cap is refused (413) before it is read whole,
a bad event is listed with its field and reason and nothing of the rest of its batch is lost (422 only
when no event of the request is valid), and every route but /healthz wants the API key.

Scoring runs in one thread, and the requests that arrive during a pass share the next one
(`client.batcher`). A reload reads the new detector in a thread and swaps it in between passes: no
request fails, and open sessions finish on the model they began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedanom.client.batcher import Batcher, RequestError
from fedanom.client.serve_metrics import Metrics
from fedanom.common.detector.artifact import MANIFEST
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.live import LiveSessions, LoadedDetector, Scored
from fedanom.common.errors import FedanomError
from fedanom.common.live_events import BadBody, parse_body
from fedanom.common.presets import Preset

WATCH_SECONDS = 2.0  # how often the state directory is looked at for a new global detector
EXPIRY_SECONDS = 5.0  # how often idle sessions are ended
RECENT_FINALS = 10_000  # ended sessions whose final answer GET /sessions/{id} still gives

log = logging.getLogger(__name__)


def load(directory: Path, device: str | None) -> LoadedDetector:
    """The detector in `directory`, named by its manifest's hash (which changes with any of its files)."""
    detector = BehaviourDetector.load(directory, device)
    digest = _digest(directory)
    return LoadedDetector(detector, digest)


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()[:12]


class Service:
    """The served detector and its open sessions, behind the HTTP routes."""

    def __init__(
        self,
        model_dir: Path,
        live: LiveSessions,
        *,
        api_key: str | None,
        max_body_bytes: int,
        watch: Path | None,
        device: str | None,
    ) -> None:
        self.model_dir, self.live, self.api_key = model_dir, live, api_key
        self.max_body_bytes, self.watch, self.device = max_body_bytes, watch, device
        self.batcher = Batcher(live)
        self.metrics = Metrics(live, lambda: self.live.model)
        self.metrics.model_info.labels(live.model.digest).set(1)
        self.watched = self._stamp()
        self.reloading = asyncio.Lock()
        self.finals: OrderedDict[str, tuple[Scored, str]] = OrderedDict()  # the latest RECENT_FINALS

    def app(self) -> Starlette:
        routes = [
            Route("/events", self._guarded(self.events), methods=["POST"]),
            Route("/sessions/{session_id:path}/end", self._guarded(self.end), methods=["POST"]),
            Route("/sessions/{session_id:path}", self._guarded(self.session), methods=["GET"]),
            Route("/admin/reload", self._guarded(self.reload), methods=["POST"]),
            Route("/metrics", self._guarded(self.metrics_page), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    # -------------------------------------------------------------------------------------------- routes
    async def events(self, request: Request) -> Response:
        started = time.perf_counter()
        records = parse_body(await self._body(request), request.headers.get("content-type", ""))
        answers, rejected, ended = await self.batcher.add(records)
        finals = [final for _, final in ended]
        self._count_ended(finals, "gap")
        elapsed = time.perf_counter() - started
        for _ in answers:
            self.metrics.latency.observe(elapsed)
        self.metrics.events.inc(len(answers))
        self.metrics.rejected.inc(len(rejected))
        self.metrics.flags.inc(sum(a.flagged for _, a in answers))
        body = {
            "events": [{"index": i, **a.as_json()} for i, a in answers],
            "rejected": rejected,
            "ended": [f.as_json() for f in finals],
        }
        return JSONResponse(body, status_code=422 if rejected and not answers else 200)

    async def end(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        final = await self.batcher.run(self.live.end, session_id)
        if final is None:
            raise RequestError(404, f"no open session '{session_id}'")
        self._count_ended([final], "end")
        return JSONResponse(final.as_json())

    async def session(self, request: Request) -> Response:
        """A recently ended session's final answer (however it ended: by hand, by its gap, idle), or
        how many events an open one holds: an idle session's final reaches the client this way."""
        session_id = request.path_params["session_id"]
        events = await self.batcher.run(self.live.size, session_id)  # between passes: it may end in one
        if events is not None:  # open (again, if its id was reused after it ended)
            return JSONResponse({"session_id": session_id, "ended": None, "events": events})
        if session_id in self.finals:
            final, how = self.finals[session_id]
            return JSONResponse({**final.as_json(), "ended": how})
        raise RequestError(404, f"no open or recently ended session '{session_id}'")

    async def reload(self, request: Request) -> Response:
        try:
            await self._reload()
        except Exception as exc:  # the old detector stays in force
            raise RequestError(422, f"the detector was not loaded, the old one serves on: {exc}") from None
        return JSONResponse({"model": self.live.model.digest})

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.live.model.digest})

    # ----------------------------------------------------------------------------------------- plumbing
    def _guarded(
        self, route: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                if self.api_key is not None and not secrets.compare_digest(
                    _presented_key(request).encode(), self.api_key.encode()
                ):
                    raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)")
                return await route(request)
            except RequestError as exc:
                return JSONResponse({"error": exc.reason}, status_code=exc.status)
            except BadBody as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except FedanomError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)

        return guarded

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        too_big = RequestError(413, f"the body is over {self.max_body_bytes:,} bytes: send smaller batches")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_big
        return bytes(body)

    def _count_ended(self, finals: list[Scored], how: str) -> None:
        for final in finals:
            self.finals[final.session_id] = (final, how)
            self.finals.move_to_end(final.session_id)
        while len(self.finals) > RECENT_FINALS:
            self.finals.popitem(last=False)
        self.metrics.ended.labels(how).inc(len(finals))
        self.metrics.ended_flagged.inc(sum(f.flagged for f in finals))
        for final in finals:
            if final.flagged:
                log.info("flagged session %s: score %.3f; %s", final.session_id, final.score, final.words)

    async def _reload(self) -> None:
        async with self.reloading:
            directory = self.watch if self.watch is not None and self.watch.exists() else self.model_dir
            loaded = await anyio.to_thread.run_sync(load, directory, self.device)
            old = self.live.model
            self.live.threshold(loaded)  # a detector without a calibration fails here, before the swap
            await self.batcher.run(setattr, self.live, "model", loaded)  # between passes: new sessions
            # start on it, open ones keep theirs
            self.metrics.model_info.remove(old.digest)
            self.metrics.model_info.labels(loaded.digest).set(1)
            self.metrics.reloads.inc()
            log.info("serving the detector %s from %s (was %s)", loaded.digest, directory, old.digest)

    def _stamp(self) -> int | None:
        if self.watch is None:
            return None
        with contextlib.suppress(OSError):
            return (self.watch / MANIFEST).stat().st_mtime_ns
        return None

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._watch_and_expire)
            tasks.start_soon(self.batcher.serve_forever)
            yield
            tasks.cancel_scope.cancel()

    async def _watch_and_expire(self) -> None:
        last_expiry = time.monotonic()
        while True:
            await anyio.sleep(WATCH_SECONDS)
            stamp = self._stamp()
            if stamp is not None and stamp != self.watched:
                self.watched = stamp
                try:
                    await self._reload()
                except Exception as exc:  # half a save, a damaged or foreign file: keep serving the old one
                    log.warning("the new detector in %s was not loaded: %s", self.watch, exc)
            if time.monotonic() - last_expiry >= EXPIRY_SECONDS:
                last_expiry = time.monotonic()
                try:
                    self._count_ended(await self.batcher.run(self.live.expire), "expired")
                except Exception:  # the next sweep tries again; scoring goes on meanwhile
                    log.exception("ending idle sessions failed")


def _presented_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key", "")


def run_service(
    model_dir: Path,
    preset: Preset,
    *,
    host: str,
    port: int,
    api_key: str | None,
    watch: Path | None,
    alert_rate: float | None,
    max_bytes: int,
    max_body_bytes: int,
    refresh_s: float,
    track: bool,
    bounds: tuple[float, float] | None,
    device: str | None,
) -> None:
    """Serve until stopped (Ctrl-C or SIGTERM; uvicorn finishes the requests in flight)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedanom serve: %(message)s")
    model = load(model_dir, device)
    rate = model.detector.alert_rate(alert_rate)
    if track and bounds is None:
        bounds = (rate / 4, min(rate * 4, 0.5))
    live = LiveSessions(
        model,
        preset,
        alert_rate=alert_rate,
        max_bytes=max_bytes,
        refresh_s=refresh_s,
        track=bounds if track else None,
    )
    service = Service(
        model_dir, live, api_key=api_key, max_body_bytes=max_body_bytes, watch=watch, device=device
    )
    log.info("serving the detector %s from %s at http://%s:%d", live.model.digest, model_dir, host, port)
    uvicorn.run(service.app(), host=host, port=port, log_level="warning", access_log=False)
