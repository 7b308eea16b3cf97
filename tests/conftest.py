"""Shared fixtures: where the real samples are, and small files written on demand."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedanom.common.detector.artifact import save_backbone
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import BackboneConfig, TrainSettings
from fedanom.common.windows import Windows
from fedanom.server.pretrain import pretrain_backbone
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

REPO = Path(__file__).resolve().parent.parent
# `make test` runs the suite on two pytest-xdist workers (`--dist loadfile`): each module runs whole on one
# worker, so its module-scoped fixture is built once. The modules that wait longest on Flower's fixed polls
# and heartbeats start first, so the other worker fills those waits with the rest of the suite. The two
# modules that start Ray go first and last, so they never run at once: two local Ray clusters would
# compete for the same ports.
STARTED_FIRST = ("test_deployment", "test_federation")
STARTED_LAST = ("test_simulate",)


@pytest.fixture(scope="module", autouse=True)
def environment_restored() -> Iterator[None]:
    """Each test module leaves the process environment as it found it: Flower's Ray backend exports the
    driver's sys.path as PYTHONPATH, and fixtures set variables their merchants' workers read."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def place(item: pytest.Item) -> int:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return 0 if module in STARTED_FIRST else 2 if module in STARTED_LAST else 1

    items.sort(key=place)  # stable: the order within each module is kept


def shared_data_dir() -> Path:
    return Path(os.environ.get("FEDANOM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real samples not found at {path} (set FEDANOM_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny backbone pretrained on a synthetic public shop, shared by the federation tests (copy it)."""
    root = tmp_path_factory.mktemp("tiny-backbone")
    public = generate_shop(ShopConfig(n_events=8_000, n_users=800, n_items=2_000), seed=50)
    ingested = ingest(write_taobao_csv(public, root / "public.csv"), resolve_preset("taobao"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    model, _ = pretrain_backbone(
        windows, BackboneConfig(d_model=32, n_layers=1, n_heads=2), TrainSettings(dp=False, epochs=1)
    )
    save_backbone(model, root / "base", {"test": True})
    return root / "base"
