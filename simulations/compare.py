"""The methods a simulation compares, each scored on every merchant's own validation and test sessions.

- `federated-dp`: the product. Flower's Simulation Engine runs the real ServerApp and ClientApp, one
  virtual SuperNode per merchant, DP-SGD at each merchant's ε; each merchant's detector is the global one
  it keeps in its state directory after the last round.
- `federated`: the same federation without DP (an upper bound on what DP costs).
- `local-only`: each merchant trains alone, with DP at the same ε, for as many epochs as the rounds.
- `centralized`: all merchants' training sessions pooled on one machine, no DP (what privacy forbids).
- `pretrained-only`: the public backbone as it is, no adapter training: what any training adds.
- `isolation-forest`, `ecod`: PyOD's, per merchant, on the session features (no sequence model), fitted
  on its training sessions.

Every method sees the same sessions: the merchant's pre-cut events split 85/15 in time into training and
validation (as the ClientApp splits them), and its post-cut test events. Every trained sequence method
uses the merchant's known attacks the same way (the federated merchants through the simulation's resolver):
with `head`, they train the adapter's anomaly head on the training sessions; on the validation sessions
they choose the score aggregation and keep known attacks out of the threshold (`pretrained-only` does
only the last two). A merchant that knows no attacks does none of this: alone it trains no head, in a
federation it scores with the head the others trained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation

from fedanom.client.app import make_client_app
from fedanom.client.merchant import Merchant, VirtualMerchants
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.training import privacy_units
from fedanom.common.flower import flower_logs_to
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import LoraSettings, RunSettings, TrainSettings
from fedanom.common.tokens import Popularity
from fedanom.common.windows import Windows
from fedanom.server.app import build_app
from fedanom.simulations.baselines import BASELINES
from fedanom.simulations.evaluation import alert_threshold, detection_metrics, validation_threshold
from fedanom.simulations.scenario import MerchantData

METHODS = (
    "federated-dp",
    "federated",
    "local-only",
    "centralized",
    "pretrained-only",
    "isolation-forest",
    "ecod",
)


@dataclass
class Sessions:
    """One merchant's sessions as every method sees them, with the truth about each."""

    train: Windows
    validation: Windows
    test: Windows
    popularity: Popularity
    bots: dict[str, str]  # the truth, which measures every method
    labelled: bool  # whether the merchant itself knows its past attacks

    def labels(self, part: Windows) -> np.ndarray:
        return np.array([u in self.bots for u in part.user], dtype=bool)

    def known(self, part: Windows) -> np.ndarray:
        """The labels the merchant has to train and calibrate with: none flagged when it keeps no record."""
        return self.labels(part) & self.labelled

    def kinds(self, part: Windows) -> np.ndarray:
        return np.array([self.bots.get(u, "") for u in part.user], dtype=object)


@dataclass
class Comparison:
    """Per method, per merchant: validation and test scores (filled in method by method)."""

    scores: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # federated runs' logs


def load_sessions(merchant: MerchantData, workdir: Path) -> Sessions:
    own = Merchant(merchant.fit_path, "taobao", workdir / "scratch", epsilon=0.0, base=None)
    train, validation, popularity = own.windows()
    ingested = ingest(merchant.test_path, resolve_preset("taobao"), popularity=popularity)
    test = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    return Sessions(train, validation, test, popularity, merchant.bots, merchant.labelled)


def run_all(
    merchants: list[MerchantData],
    sessions: list[Sessions],
    base: Path,
    workdir: Path,
    *,
    rounds: int,
    epsilon: float,
    seed: int,
    head: bool = True,
    unit: str = TrainSettings.privacy_unit,
    on_method: Callable[[str], None] = lambda _: None,
    verbose: bool = False,
) -> Comparison:
    """Every method on the same sessions; `unit` is what the DP-trained ones protect as one."""
    result = Comparison()
    for method in METHODS:
        on_method(method)
        if method.startswith("federated"):
            dp = method == "federated-dp"
            scores, log = federated(
                merchants,
                sessions,
                base,
                workdir / method,
                rounds,
                epsilon,
                dp,
                seed,
                head,
                overrides={"privacy-unit": unit},
                verbose=verbose,
            )
            result.rounds[method] = log
        elif method == "local-only":
            scores = [local(s, base, rounds, epsilon, seed, head, unit) for s in sessions]
        elif method == "centralized":
            scores = centralized(sessions, base, rounds, seed, head)
        elif method == "pretrained-only":
            scores = [pretrained(s, base, seed) for s in sessions]
        else:
            scores = []
            for s in sessions:
                baseline = BASELINES[method](seed).fit(s.train)
                scores.append((baseline.decision_function(s.validation), baseline.decision_function(s.test)))
        result.scores[method] = scores
    return result


def federated(
    merchants: list[MerchantData],
    sessions: list[Sessions],
    base: Path,
    run_dir: Path,
    rounds: int,
    epsilon: float,
    dp: bool,
    seed: int,
    head: bool,
    *,
    mods: Sequence[Mod] = (),
    overrides: Mapping[str, bool | float | int | str] | None = None,
    verbose: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict[str, Any]]]:
    """The federation's run; `mods` wrap every merchant's ClientApp and `overrides` change the run config
    (benchmarks/poisoning.py makes some merchants hostile this way)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    labels: list[Path | None] = []  # None where it knows no attacks (a client without --labels)
    for i, s in enumerate(sessions):
        path = run_dir / f"labels-{i}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("user_id,label\n" + "".join(f"{user},1\n" for user in s.bots))
        labels.append(path if s.labelled else None)
    virtual = VirtualMerchants(
        data=tuple(m.fit_path for m in merchants),
        state_root=run_dir / "state",
        base=base,
        epsilon=epsilon,
        labels=tuple(labels),
    )
    config: dict[str, bool | float | int | str] = {
        "num-server-rounds": rounds,
        "min-nodes": len(merchants),
        "base": str(base),
        "run-dir": str(run_dir),
        "dp": dp,
        "lora-seed": seed,
        "supervised-head": head,
        "round-timeout": 3600.0,  # two cores train every merchant in turn: a round outlasts a deployed one
        **(overrides or {}),
    }
    with contextlib.nullcontext() if verbose else flower_logs_to(run_dir / "flower.log"):
        run_simulation(
            server_app=build_app(config),
            client_app=make_client_app(mods, merchants=virtual),
            num_supernodes=len(merchants),
            # what the merchants' processes print stays in Ray's own session logs
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "log_to_driver": verbose,
                    "logging_level": logging.INFO if verbose else logging.WARNING,
                },
            },
        )
    scores = []
    for i, s in enumerate(sessions):
        detector = BehaviourDetector.load(run_dir / "state" / f"merchant-{i}" / "detector")
        scores.append((detector.decision_function(s.validation), detector.decision_function(s.test)))
    log = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return scores, log


def _settings(rounds: int, dp: bool, seed: int, unit: str = TrainSettings.privacy_unit) -> TrainSettings:
    """What a federation's merchant does in `rounds` rounds, in one go."""
    return replace(RunSettings(privacy_unit=unit).local_settings(rounds), dp=dp, seed=seed)


def local(
    s: Sessions, base: Path, rounds: int, epsilon: float, seed: int, head: bool, unit: str
) -> tuple[np.ndarray, np.ndarray]:
    lora = LoraSettings(seed=seed, supervised_head=head and s.labelled)
    detector = BehaviourDetector.from_backbone(base, s.popularity, lora=lora)
    fit = Windows.concat([s.train, s.validation])
    train = _settings(rounds, True, seed, unit)
    delta = 1.0 / privacy_units(s.train, train)  # as a merchant of the federation fixes it
    ledger = PrivacyLedger(epsilon_budget=epsilon, delta=delta, unit=unit)
    detector.fit(fit, s.known(fit), train=train, ledger=ledger)
    return detector.decision_function(s.validation), detector.decision_function(s.test)


def pretrained(s: Sessions, base: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    detector = BehaviourDetector.from_backbone(base, s.popularity, lora=LoraSettings(seed=seed))
    detector.calibrate(s.validation, s.known(s.validation), training=s.train.select(~s.known(s.train)))
    return detector.decision_function(s.validation), detector.decision_function(s.test)


def centralized(
    sessions: list[Sessions], base: Path, rounds: int, seed: int, head: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    pooled = Windows.concat(
        [s.train.keyed(f"merchant-{i}") for i, s in enumerate(sessions)]
        + [s.validation.keyed(f"merchant-{i}") for i, s in enumerate(sessions)]
    )
    labels = np.concatenate([s.known(s.train) for s in sessions] + [s.known(s.validation) for s in sessions])
    lora = LoraSettings(seed=seed, supervised_head=head)
    detector = BehaviourDetector.from_backbone(base, sessions[0].popularity, lora=lora)
    detector.fit(pooled, labels, train=_settings(rounds, False, seed))
    return [(detector.decision_function(s.validation), detector.decision_function(s.test)) for s in sessions]


def metrics(sessions: list[Sessions], comparison: Comparison) -> dict[str, list[dict[str, Any]]]:
    """Per method, per merchant: the test metrics at the threshold chosen on that merchant's validation."""
    out = {}
    for method, scores in comparison.scores.items():
        out[method] = [
            detection_metrics(
                s.labels(s.test),
                test,
                s.kinds(s.test),
                validation_threshold(s.labels(s.validation), val),
                alert_threshold(s.labels(s.validation), val),
            )
            for s, (val, test) in zip(sessions, scores, strict=True)
        ]
    return out
