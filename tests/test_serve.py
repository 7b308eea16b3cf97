"""`fedanom serve` as a merchant runs it: a real uvicorn process on loopback, spoken to over real HTTP.

Two services start once for the module: one behind an API key that scores with the popularity refreshed
on every request (so its final scores can equal `fedanom score`'s), one with a small memory cap that
follows a state directory for new detectors.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from fedanom.client.batcher import MAX_WAITING_EVENTS, Batcher, RequestError
from fedanom.client.stream import EventStream, StreamError
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.live import TRACK_WARMUP, LiveSessions, LoadedDetector
from fedanom.common.detector.scores import score_events
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import TrainSettings
from fedanom.common.windows import Windows
from fedanom.simulations.attacks import inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

KEY = "k" * 8 + "-serve-test-key"
TAOBAO = resolve_preset("taobao").column_names


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """A detector trained (without DP: this module is about serving it) on a synthetic shop."""
    root = tmp_path_factory.mktemp("serve")
    path = write_taobao_csv(generate_shop(ShopConfig(n_events=5_000, n_users=500), seed=21), root / "m.csv")
    ingested = ingest(path, resolve_preset("taobao"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    detector = BehaviourDetector.from_backbone(tiny_backbone, ingested.popularity)
    detector.fit(windows, train=TrainSettings(dp=False, epochs=1)).save(root / "detector")
    (root / "key").write_text(KEY + "\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, name: str, *args: str) -> Iterator[str]:
    port = free_port()
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115  # closed below, after the process
    command = [
        sys.executable,
        "-m",
        "fedanom",
        "serve",
        "-m",
        "detector",
        "-p",
        "taobao",
        "--port",
        str(port),
    ]
    process = subprocess.Popen([*command, *args], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    assert process.poll() is None, (root / f"{name}.log").read_text()[-3000:]
    try:
        yield url
    finally:
        process.terminate()  # uvicorn finishes what is in flight, then ends by the signal it got
        code = process.wait(timeout=30)
        log.close()
        assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), (root / f"{name}.log").read_text()[-3000:]
        assert "Traceback" not in (root / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def keyed(root: Path) -> Iterator[str]:
    yield from start(root, "keyed", "--api-key-file", "key", "--popularity-refresh", "0")


@pytest.fixture(scope="module")
def capped(root: Path) -> Iterator[str]:
    (root / "state").mkdir()
    yield from start(root, "capped", "--max-memory-mb", "0.25", "--state-dir", "state")


def first_sessions(frame: pd.DataFrame) -> pd.DataFrame:
    """Each user's first session only (30 minutes of inactivity end one), in time order: a stream whose
    sessions all stay open until they are ended by hand, as a file's sessions end with the file."""
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    new = frame.groupby("user_id").timestamp.diff().fillna(0) > 30 * 60
    return frame[new.groupby(frame.user_id).cumsum() == 0].sort_values("timestamp", kind="stable")


def as_events(frame: pd.DataFrame) -> list[dict[str, Any]]:
    renamed = frame[["user_id", "item_id", "category_id", "event_type", "timestamp"]]
    return [dict(zip(TAOBAO, row, strict=True)) for row in renamed.itertuples(index=False)]


def test_a_sessions_final_streamed_score_is_fedanom_scores(root: Path, keyed: str) -> None:
    shop = generate_shop(ShopConfig(n_events=2_000, n_users=200), seed=22)
    later = first_sessions(inject(shop, {"scraping-crude": 2, "carding-mimic": 2}, seed=23))
    events = as_events(later)
    with EventStream(keyed, api_key=KEY) as stream:
        answers = [a for k in range(0, len(events), 64) for a in stream.send(events[k : k + 64])["events"]]
        assert [a["index"] for a in answers[:64]] == list(range(64))  # every event answered, in order
        assert len(answers) == len(events)
        some = answers[-1]["session_id"]
        assert stream.session(some) == {"session_id": some, "ended": None, "events": answers[-1]["events"]}
        finals = {s: stream.end(s) for s in dict.fromkeys(a["session_id"] for a in answers)}
        assert stream.session(some) == {**finals[some], "ended": "end"}  # as a session that ended idle
    write_taobao_csv(later, root / "later.csv")
    batch = score_events(BehaviourDetector.load(root / "detector"), root / "later.csv", preset="taobao")
    assert set(batch.session_id) == set(finals)
    for row in batch.itertuples():
        final = finals[row.session_id]
        assert final["score"] == pytest.approx(row.score, abs=1e-4), row.session_id
        assert final["events"] == row.events and final["flagged"] == row.flag
    # a running answer names the session's latest event by its place in the session, not a request's line
    assert all(re.match(rf"event {a['events']}: \w+ .*1-in-", a["why"][0]) for a in answers)


def test_bad_events_are_listed_and_the_rest_of_the_batch_is_scored(keyed: str) -> None:
    good = {
        "user_id": "7",
        "item_id": "3",
        "category_id": "1",
        "behavior_type": "pv",
        "timestamp": 1_700_000_000,
    }
    late = {**good, "timestamp": 1_700_000_020}
    batch = [good, {**good, "behavior_type": "teleport"}, {**good, "item_id": {"a": 1}}, 5, late]
    with EventStream(keyed, api_key=KEY) as stream:
        answer = stream.send(batch)
        assert [e["index"] for e in answer["events"]] == [0, 4]
        assert answer["rejected"] == [
            {"index": 1, "field": "behavior_type", "reason": "unknown event type"},
            {"index": 2, "field": "item_id", "reason": "holds a JSON object or list, not one value"},
            {"index": 3, "field": "", "reason": "an event is a JSON object, not int"},
        ]
        assert answer["events"][1]["events"] == 2  # the valid events joined one session
    headers = {"Authorization": f"Bearer {KEY}"}
    one_bad = httpx.post(f"{keyed}/events", json={**good, "timestamp": "yesterday"}, headers=headers)
    assert one_bad.status_code == 422
    assert one_bad.json()["rejected"][0] == {
        "index": 0,
        "field": "timestamp",
        "reason": "unparseable timestamp",
    }
    lines = json.dumps(good).encode() + b'\n{"user_id": \n' + json.dumps(late).encode()
    ndjson = httpx.post(
        f"{keyed}/events", content=lines, headers={**headers, "Content-Type": "application/x-ndjson"}
    )
    assert [e["index"] for e in ndjson.json()["events"]] == [0, 2]  # the broken line alone is left out
    assert ndjson.json()["rejected"][0]["index"] == 1 and "not JSON" in ndjson.json()["rejected"][0]["reason"]
    not_json = httpx.post(f"{keyed}/events", content=b'{"user_id": ', headers=headers)
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    huge = httpx.post(f"{keyed}/events", content=b" " * (1 << 20) + b"[]", headers=headers)
    assert huge.status_code == 413 and "over 1,048,576 bytes" in huge.json()["error"]
    gone = httpx.post(f"{keyed}/sessions/nobody/end", headers=headers)
    assert gone.status_code == 404 and "no open session 'nobody'" in gone.json()["error"]


def test_every_route_but_health_wants_the_key(root: Path, keyed: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
        for method, path in (("POST", "/events"), ("GET", "/metrics"), ("POST", "/admin/reload")):
            answer = httpx.request(method, f"{keyed}{path}", headers=headers, content=b"[]")
            assert answer.status_code == 401, (headers, path)
    assert httpx.get(f"{keyed}/metrics", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{keyed}/healthz").status_code == 200
    with pytest.raises(StreamError, match="401"):
        EventStream(keyed, api_key="wrong").send([])


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: give an --api-key-file"),
        (["--api-key-file", "absent.key"], "--api-key-file absent.key does not exist"),
        (["--alert-rate-bounds", "0.01,0.02"], "--alert-rate-bounds bounds the tracked threshold: add"),
        (["--track-alert-rate", "--alert-rate-bounds", "0.2,0.1"], "need 0 < FEWEST < MOST < 1"),
    ],
)
def test_a_serve_mistake_is_one_sentence(root: Path, options: list[str], sentence: str) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "fedanom", "serve", "-m", "detector", "-p", "taobao", *options],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert sentence in refused.stderr


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_a_new_detector_is_served_without_failing_a_request(root: Path, capped: str) -> None:
    shop = as_events(first_sessions(generate_shop(ShopConfig(n_events=600, n_users=40), seed=24)))
    failures: list[str] = []
    stop, sent = threading.Event(), [0]

    def keep_sending() -> None:  # other sessions' events, one per request, until the swaps are done
        with EventStream(capped) as stream:
            while not stop.is_set():
                try:
                    stream.send([shop[10 + sent[0] % (len(shop) - 10)]])
                    sent[0] += 1
                except (StreamError, httpx.HTTPError) as exc:
                    failures.append(repr(exc))

    with EventStream(capped) as stream:
        before = stream.send(shop[:1])["events"][0]
        sender = threading.Thread(target=keep_sending)
        sender.start()
        detector = BehaviourDetector.load(root / "detector")
        detector.provenance["note"] = "the federation's next round"
        detector.save(root / "state" / "detector")  # as `fedanom client` leaves a global detector
        deadline = time.monotonic() + 60
        while (
            httpx.get(f"{capped}/healthz").json()["model"] == before["model"] and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        new = httpx.get(f"{capped}/healthz").json()["model"]
        assert new != before["model"]
        same_session = {**shop[0], "timestamp": shop[0]["timestamp"] + 1}
        assert stream.send([same_session])["events"][0]["model"] == before["model"]  # it began on the old one
        fresh = {**shop[0], "user_id": "someone new"}
        assert stream.send([fresh])["events"][0]["model"] == new
        assert stream.reload() == new
        stop.set()
        sender.join(timeout=60)
    assert sent[0] > 10 and failures == []
    assert metric(capped, "fedanom_serve_reloads_total") == 2
    assert f'fedanom_serve_model{{hash="{new}"}} 1.0' in httpx.get(f"{capped}/metrics").text


def test_open_sessions_past_the_memory_cap_are_evicted_least_recent_first(capped: str) -> None:
    base = {"item_id": "3", "category_id": "1", "behavior_type": "pv"}
    with EventStream(capped) as stream:
        for user in range(150):  # each a session of 20 events: about 3.5 KB held, 500 KB in all
            stream.send(
                [{**base, "user_id": f"cap-{user}", "timestamp": 1_800_000_000 + k} for k in range(20)]
            )
        last = stream.send([{**base, "user_id": "cap-149", "timestamp": 1_800_000_030}])
        assert last["events"][0]["events"] == 21  # the most recent session kept all its events
        with pytest.raises(StreamError, match="404"):
            stream.end("cap-0:1800000000000")  # the least recently active went first
    assert metric(capped, "fedanom_serve_evictions") > 0
    assert metric(capped, "fedanom_serve_open_session_bytes") <= 0.25 * 2**20
    assert 0 < metric(capped, "fedanom_serve_open_sessions") < 150


def test_a_tracked_threshold_flags_the_alert_rate_of_recent_sessions_within_the_bounds(root: Path) -> None:
    detector = BehaviourDetector.load(root / "detector")
    live = LiveSessions(LoadedDetector(detector, "d"), resolve_preset("taobao"), track=(0.005, 0.04))
    highest, lowest = detector.threshold(0.005), detector.threshold(0.04)
    events = as_events(first_sessions(generate_shop(ShopConfig(n_events=6_000, n_users=600), seed=25)))
    answers, _, _ = live.add(events)
    assert live.threshold(live.model) == detector.threshold()  # nothing has ended yet: the calibrated one
    for session_id in dict.fromkeys(a.session_id for _, a in answers):
        live.end(session_id)
    recent = np.array(live.model.recent)
    assert len(recent) >= TRACK_WARMUP
    tracked = live.threshold(live.model)
    assert lowest <= tracked <= highest
    assert tracked == np.clip(np.quantile(recent, 0.99), lowest, highest)
    if lowest < tracked < highest:  # not held at a bound: the alert rate's share of recent sessions
        assert (recent > tracked).mean() <= 0.01 + 1 / len(recent)


def test_a_pass_that_cannot_be_scored_leaves_the_sessions_as_they_were(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside scoring (faked: no real input causes one) puts back every event of the pass, so
    the request tried again is counted once; the service's queue refuses work past its bound (503)."""
    live = LiveSessions(
        LoadedDetector(BehaviourDetector.load(root / "detector"), "d"), resolve_preset("taobao")
    )
    events = as_events(first_sessions(generate_shop(ShopConfig(n_events=2_000, n_users=40), seed=26)))
    half = len(events) // 2
    live.add(events[:half])
    before = ({k: s.events.num_rows for k, s in live.sessions.items()}, live.held_bytes)

    def broken(pieces: object) -> None:
        raise RuntimeError("the model failed")

    with monkeypatch.context() as patched:
        patched.setattr(live, "_score", broken)
        with pytest.raises(RuntimeError):
            live.add(events[half:])
    assert ({k: s.events.num_rows for k, s in live.sessions.items()}, live.held_bytes) == before
    answers, _, _ = live.add(events[half:])  # tried again: each event joins once
    assert len(answers) == len(events) - half
    assert sum(s.events.num_rows for s in live.sessions.values()) == len(events)

    async def flood() -> None:
        batcher = Batcher(live)
        batcher.waiting.append((list(range(MAX_WAITING_EVENTS)), asyncio.get_running_loop().create_future()))
        with pytest.raises(RequestError, match="the service is behind"):
            await batcher.add(events[:1])

    asyncio.run(flood())
