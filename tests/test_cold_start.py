"""A merchant's cold start: its prepared data and its backbone's hash are kept in its state directory, so
each fresh ClientApp process reads them instead of re-reading the export and re-hashing the weights.
Each is rebuilt when what it depends on changes, and a damaged file is rebuilt, never trusted. The
model work goes to the merchant's warm worker, which only the merchant can reach."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import fields
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest

from fedanom.client import worker
from fedanom.client.merchant import Merchant
from fedanom.client.supernode import warm_worker
from fedanom.common import prepared as prepared_module
from fedanom.common.backbone import backbone_hash, content_hash, weight_files
from fedanom.common.errors import FedanomError
from fedanom.common.prepared import CACHE_DIR, Prepared, cache_state, prepare
from fedanom.common.presets import resolve_preset
from fedanom.common.records import to_record
from fedanom.common.sessions import SessionConfig
from fedanom.common.windows import Windows
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

TAOBAO = resolve_preset("taobao")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    shop = generate_shop(ShopConfig(n_events=3_000, n_users=300, n_items=600), seed=3)
    return write_taobao_csv(shop, tmp_path / "events.csv")


def cached(state: Path) -> list[Path]:
    return sorted((state / CACHE_DIR).glob("*.npz"))


def assert_same(a: Prepared, b: Prepared) -> None:
    for part in ("train", "validation"):
        for f in fields(Windows):
            x, y = getattr(getattr(a, part), f.name), getattr(getattr(b, part), f.name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (part, f.name)
    for name in ("items", "counts", "buckets"):
        assert np.array_equal(getattr(a.popularity, name), getattr(b.popularity, name))


def test_the_second_read_comes_from_the_cache_and_equals_a_fresh_one(export: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cache_state(export, TAOBAO, state).startswith("none")
    first = prepare(export, TAOBAO, state)
    [kept] = cached(state)
    stamp = kept.stat()
    second = prepare(export, TAOBAO, state)
    assert cached(state) == [kept] and kept.stat().st_ino == stamp.st_ino  # read, not written again
    assert kept.stat().st_mtime_ns == stamp.st_mtime_ns
    assert_same(first, second)
    assert type(second.train.session[0]) is str and type(second.validation.user[0]) is str
    assert cache_state(export, TAOBAO, state).startswith("current")


def test_a_changed_file_settings_or_vocabulary_rebuilds_the_one_entry(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    prepare(export, TAOBAO, state)
    [before] = cached(state)
    with open(export, "a") as fh:  # one more event from a new visitor
        fh.write("999999,1,1,pv,1511700000\n")
    assert cache_state(export, TAOBAO, state).startswith("stale")
    grown = prepare(export, TAOBAO, state)
    [after_file] = cached(state)
    assert after_file != before  # a new key, and the old entry is gone: one entry per merchant
    assert grown.events == prepare(export, TAOBAO, tmp_path / "fresh").events
    short = prepare(export, TAOBAO, state, SessionConfig(window=8))
    [after_settings] = cached(state)
    assert after_settings != after_file and short.train.lengths.max() <= 8
    monkeypatch.setattr(prepared_module, "VOCAB_VERSION", "bt-next")
    prepare(export, TAOBAO, state, SessionConfig(window=8))
    assert cached(state) != [after_settings] and len(cached(state)) == 1


def test_bad_rows_set_aside_once_still_stop_a_read_that_allows_none(export: Path, tmp_path: Path) -> None:
    with open(export, "a") as fh:
        fh.write("999999,1,1,pv,not-a-time\n")
    state = tmp_path / "state"
    assert prepare(export, TAOBAO, state).rows_quarantined == 1
    with pytest.raises(FedanomError, match="1 bad rows"):
        prepare(export, TAOBAO, state, on_bad_rows="fail")  # from the cache, as `fedanom client` reads


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "not a zip"])
def test_a_damaged_cache_is_rebuilt_never_trusted(export: Path, tmp_path: Path, damage: str) -> None:
    state = tmp_path / "state"
    fresh = prepare(export, TAOBAO, state)
    [kept] = cached(state)
    data = bytearray(kept.read_bytes())
    if damage == "flipped bytes":  # inside the first array's data: only its CRC can tell
        for i in range(200, 240):
            data[i] ^= 0xFF
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"garbage")
    kept.write_bytes(bytes(data))
    again = prepare(export, TAOBAO, state)
    assert_same(fresh, again)
    [rebuilt] = cached(state)
    assert rebuilt.read_bytes() != bytes(data)


def test_a_backbone_is_hashed_again_only_when_its_files_change(tiny_backbone: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_backbone, base)
    cache = tmp_path / "state" / "backbone-hashes.json"
    first = backbone_hash(base, cache=cache)
    assert first == content_hash(base, weight_files(base))
    assert json.loads(cache.read_text())[str(base.resolve())]["hash"] == first
    weights = next(base.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size; the write moves its mtime
    weights.write_bytes(bytes(data))
    changed = backbone_hash(base, cache=cache)
    assert changed != first and changed == content_hash(base, weight_files(base))
    cache.write_text("{not json")  # a damaged cache is ignored and written anew
    assert backbone_hash(base, cache=cache) == changed
    assert json.loads(cache.read_text())[str(base.resolve())]["hash"] == changed


def test_a_backbone_query_does_not_load_the_model_stack(tiny_backbone: Path, tmp_path: Path) -> None:
    """A query is answered in a fresh process without torch: it needs only the backbone's hash."""
    expected = backbone_hash(tiny_backbone)
    probe = f"""
import sys
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import MessageType
from fedanom.client import app
context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={{}}, node_config={{
    "data": "unused.csv", "state-dir": {str(tmp_path / "state")!r}, "epsilon": 8.0,
    "base": {str(tiny_backbone)!r}}})
config = ConfigRecord({{"backbone-hash": {expected!r}}})
msg = Message(metadata=Metadata(1, "m", 0, 7, "", "", 0.0, 60.0, MessageType.QUERY),
              content=RecordDict({{"config": config}}))
reply = app.query(msg, context)
print(reply.content.config_records["backbone"]["has-backbone"])
print([m for m in ("torch", "transformers", "peft", "opacus", "sklearn") if m in sys.modules])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    has, loaded = result.stdout.splitlines()
    assert has == "True" and loaded == "[]"
    assert (tmp_path / "state" / "backbone-hashes.json").exists()


def test_the_warm_worker_answers_only_its_merchant_and_stops_with_the_client(tmp_path: Path) -> None:
    """A connection without the key is refused and the worker goes on; a request's failure crosses as
    the same error the ClientApp would have raised itself; stopping it leaves no socket behind."""
    state = tmp_path / "state"
    with open(tmp_path / "worker.log", "w") as log, warm_worker(state, dict(os.environ), log) as warm:
        assert warm.poll() is None  # it listens once the block starts
        for name in (worker.SOCKET, worker.KEY):
            assert stat.S_IMODE((state / name).stat().st_mode) & 0o077 == 0, name  # the merchant's alone
        with pytest.raises(AuthenticationError):
            Client(str(state / worker.SOCKET), family="AF_UNIX", authkey=b"a guess")
        merchant = Merchant(tmp_path / "missing.csv", "taobao", state, 8.0, None)
        with pytest.raises(FedanomError, match=r"missing\.csv does not exist"):
            worker.evaluate(merchant, {"backbone-hash": "0" * 64}, to_record({}))
    assert warm.returncode is not None and not (state / worker.SOCKET).exists()
    assert "refused a connection" in (tmp_path / "worker.log").read_text()
