"""A simulation study, as `fedanom simulate` runs it once its options are checked: merchants prepared,
a backbone pretrained on a separate synthetic "public" shop (unless one is given), every method run
on the same sessions, one report.

The console shows one progress display: the step, for a federated method its round of how many and how
many merchants' updates the last round accepted, the time so far and about how much is left (each round
of a federated method counts as one step, every other method as one). Flower's and Ray's logs go to
`flower.log` in each federated method's directory, named at the end.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import PRETRAIN, BackboneConfig
from fedanom.common.windows import Windows
from fedanom.simulations.calibration import behaviour_stats
from fedanom.simulations.compare import METHODS, load_sessions, metrics, run_all
from fedanom.simulations.report import write_report
from fedanom.simulations.scenario import partition, prepare, real_shops, synthetic_shops
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

# The operator's public data is not the merchants' traffic: another shop, with shorter, slower sessions
# and a thinner funnel. What the merchants' adapters must learn is that difference (with the same
# generator settings for both, the backbone already knows everything and no method can add anything).
PUBLIC_SHOP = ShopConfig(
    n_events=30_000,
    n_users=3_000,
    n_items=8_000,
    mean_session_events=2.5,
    median_gap_s=90.0,
    p_fav=0.01,
    p_cart=0.03,
    zipf_a=1.3,
    p_login=0.05,
)
SETUP_STEPS = 3  # preparing the merchants, pretraining (or not), reading their sessions


@dataclass(frozen=True)
class Study:
    """What to simulate: synthetic merchants of these sizes, or real exports (one split by a partition)."""

    shop_events: list[int]
    sources: list[tuple[Path, str]]
    merchants: int
    partition: str | None
    rounds: int
    epsilon: float
    seed: int
    test_share: float
    unlabelled: int
    head: bool
    privacy_unit: str
    backbone: BackboneConfig
    base: Path | None
    verbose: bool


def run_study(study: Study, out: Path, console: Console) -> dict[str, Any]:
    """Run every method and write the report to `out`; the results as report.md states them."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    with _progress(console, study, work) as step:
        step("preparing merchants")
        shops = _shops(study)
        calibration = {name: behaviour_stats(frame) for name, frame in shops}
        prepared = prepare(shops, work / "merchants", study.seed, study.test_share, study.unlabelled)
        head = study.head and any(m.labelled for m in prepared)  # nobody's labels: a head learns nothing
        step("pretraining the backbone")
        base = study.base or pretrain_public_backbone(work, study.backbone, study.seed)
        step("reading sessions")
        sessions = [load_sessions(m, work) for m in prepared]
        comparison = run_all(
            prepared,
            sessions,
            base,
            work,
            rounds=study.rounds,
            epsilon=study.epsilon,
            seed=study.seed,
            head=head,
            unit=study.privacy_unit,
            on_method=step,
            verbose=study.verbose,
        )
    scenario = {
        "rounds": study.rounds,
        "test_share": study.test_share,
        "supervised_head": head,
        "epsilon": study.epsilon,
        "privacy_unit": study.privacy_unit,
        "seed": study.seed,
        "backbone": str(base),
        "merchants": [
            {"name": m.name, "events": m.events, "bots": len(m.bots), "labelled": m.labelled}
            for m in prepared
        ],
        "calibration": calibration,
        "seconds": time.perf_counter() - started,
    }
    names = [m.name for m in prepared]
    return write_report(out, scenario, names, sessions, comparison, metrics(sessions, comparison))


def _shops(study: Study) -> list[tuple[str, pd.DataFrame]]:
    if not study.sources:
        return synthetic_shops(study.shop_events, study.seed)
    if study.partition:
        ((name, frame),) = real_shops(study.sources)
        parts = partition(frame, study.merchants, study.partition, study.seed)
        return [(f"{name}#{k + 1}", part) for k, part in enumerate(parts)]
    return real_shops(study.sources)


def pretrain_public_backbone(work: Path, config: BackboneConfig, seed: int) -> Path:
    """The operator's backbone of a simulation: pretrained on the synthetic public shop, in `work/base`."""
    from fedanom.common.detector.artifact import save_backbone
    from fedanom.server.pretrain import pretrain_backbone

    public = generate_shop(PUBLIC_SHOP, seed=seed + 10_000)
    ingested = ingest(write_taobao_csv(public, work / "public.csv"), resolve_preset("taobao"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    model, _ = pretrain_backbone(windows, config, replace(PRETRAIN, seed=seed))
    save_backbone(model, work / "base", {"simulation": "synthetic public shop", "seed": seed})
    return work / "base"


class _StudyProgress:
    """The one progress display: `step(name)` moves it on; a federated method's rounds move it too."""

    def __init__(self, bar: Progress, study: Study, work: Path) -> None:
        self.bar, self.rounds, self.work = bar, study.rounds, work
        steps = SETUP_STEPS + sum(self._size(m) for m in METHODS)
        self.task = bar.add_task("starting", total=steps)
        self.name, self.done = "", 0

    def _size(self, name: str) -> int:
        return self.rounds if name.startswith("federated") else 1

    def step(self, name: str) -> None:
        if self.name:
            self.done += self._size(self.name)
        self.name = name
        self.bar.update(self.task, description=name, completed=self.done)

    def follow(self, stop: threading.Event) -> None:
        """Each second, the current federated method's rounds as its ServerApp logs them."""
        while not stop.wait(1.0):
            name, done = self.name, self.done
            if name.startswith("federated"):
                ended = _ended_rounds(self.work / name / "rounds.jsonl")
                last = f", last accepted {len(ended[-1].get('accepted', []))} updates" if ended else ""
                current = min(len(ended) + 1, self.rounds)
                self.bar.update(
                    self.task,
                    description=f"{name}: round {current} of {self.rounds}{last}",
                    completed=done + len(ended),
                )


@contextmanager
def _progress(console: Console, study: Study, work: Path) -> Iterator[Callable[[str], None]]:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        progress = _StudyProgress(bar, study, work)
        stop = threading.Event()
        follower = threading.Thread(target=progress.follow, args=(stop,), daemon=True)
        follower.start()
        try:
            yield progress.step
            progress.step("done")
        finally:
            stop.set()
            follower.join()


def _ended_rounds(log: Path) -> list[dict[str, Any]]:
    try:
        lines = log.read_text().split("\n")[:-1]  # a line still being written has no newline yet
        return [record for record in map(json.loads, lines) if isinstance(record, dict)]
    except (OSError, ValueError):
        return []
