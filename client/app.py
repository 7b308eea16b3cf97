"""The merchant's Flower ClientApp: one round of local DP training on the global adapter.

ClientApps are stateless, so everything that must last lives in the merchant's state directory: the
privacy ledger (ε accumulates across rounds and runs) and the latest global detector, calibrated on the
merchant's own validation sessions and ready for `fedanom score`. Only the adapter's trained tensors and
the whitelisted metrics below leave the merchant, or a failure's fixed code and words (`FAILURES`).

The merchant is described by the SuperNode's node config (`data`, `preset`, `state-dir`, `epsilon`, and
optionally `base` and `labels`: its known attacks, which train the adapter's anomaly head when the run
has one); in simulation, by the `sim-data` files the server forwards, indexed by
the node's partition id. Everything else arrives with each round's message, so simulation and deployment
behave alike. The backbone is found by the content hash the server announces: the merchant's own `base`
if it matches, else one the server shipped earlier into `<state-dir>/backbones/<hash>` (`query`).
"""

from __future__ import annotations

import functools
import hashlib
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import log
from peft import PeftModel
from sklearn.metrics import average_precision_score, roc_auc_score

from fedanom.common.detector.artifact import backbone_hash, install_backbone, load_backbone
from fedanom.common.detector.detector import DEFAULT_AGGREGATION, BehaviourDetector
from fedanom.common.detector.model import HEAD, attach_lora, trainable_state
from fedanom.common.detector.privacy import BudgetExhausted, PrivacyLedger
from fedanom.common.detector.training import train_model
from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.labels import read_labels
from fedanom.common.presets import resolve_preset
from fedanom.common.records import (
    BACKBONE_REFUSED,
    BUDGET_EXHAUSTED,
    EVALUATE_METRICS,
    FAILURES,
    HAS_BACKBONE,
    MERCHANT_FAILED,
    MERCHANT_SETUP,
    SCORE_HEAD,
    TRAIN_METRICS,
    Metrics,
    flag,
    lora_settings,
    number,
    text,
    to_numpy,
    to_record,
)
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import ALERT_RATE, TrainSettings
from fedanom.common.tokens import Popularity
from fedanom.common.windows import Windows

# The only metrics a merchant reports (a test checks every outgoing message against this list).
METRIC_KEYS = (*TRAIN_METRICS, *EVALUATE_METRICS)


@dataclass(frozen=True)
class Merchant:
    data: Path
    preset: str | None
    state_dir: Path
    epsilon: float
    base: Path | None  # the merchant's own copy of the backbone, if it has one
    labels: Path | None = None  # known attacks among its sessions, to measure the global detector with
    simulated: bool = False  # a research run: its DP noise is seeded per round, so it can be reproduced

    @classmethod
    def from_context(cls, context: Context, config: Mapping[str, object]) -> Merchant:
        """From the SuperNode's node config, or in simulation from the round's config and partition id."""
        node = context.node_config
        if "data" in node:  # a real SuperNode, started by `fedanom client`
            return cls(
                data=Path(text(node, "data")),
                preset=text(node, "preset") or None,
                state_dir=Path(text(node, "state-dir", ".fedanom-state")),
                epsilon=number(node, "epsilon"),
                base=Path(text(node, "base")) if text(node, "base") else None,
                labels=Path(text(node, "labels")) if text(node, "labels") else None,
            )
        partition = int(number(node, "partition-id"))
        files = text(config, "sim-data").split(";")
        labels = text(config, "sim-labels").split(";")  # one per merchant; empty: it knows no attacks
        known = labels[partition % len(labels)]
        return cls(
            data=Path(files[partition % len(files)]),
            preset=text(config, "sim-preset") or None,
            state_dir=Path(text(config, "sim-state-root")) / f"merchant-{partition}",
            epsilon=number(config, "epsilon"),
            base=Path(text(config, "base")),
            labels=Path(known) if known else None,
            simulated=True,
        )

    def backbone(self, expected_hash: str) -> Path | None:
        """The backbone directory with this content hash, if the merchant holds it."""
        for candidate in (self.base, self.state_dir / "backbones" / expected_hash):
            if (
                candidate is not None
                and (candidate / "config.json").exists()
                and backbone_hash(candidate) == expected_hash
            ):
                return candidate
        return None

    def require_backbone(self, config: Mapping[str, object]) -> Path:
        expected = text(config, "backbone-hash")
        found = self.backbone(expected)
        if found is None:
            raise FedanomError(
                f"this merchant does not hold the backbone {expected[:12]} and none was shipped"
            )
        return found

    def windows(self) -> tuple[Windows, Windows, Popularity]:
        """This merchant's sessions to train on and to validate on (`Windows.holdout`)."""
        ingested = ingest(
            self.data, resolve_preset(self.preset), quarantine_path=self.state_dir / "quarantine.csv"
        )
        windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
        train, validation = windows.holdout()
        return train, validation, ingested.popularity


def global_model(merchant: Merchant, config: Mapping[str, object], arrays: ArrayRecord) -> PeftModel:
    """The backbone on the merchant's disk with the global adapter loaded into it."""
    model = attach_lora(load_backbone(merchant.require_backbone(config)), lora_settings(config))
    incoming = arrays.to_torch_state_dict()
    own = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(incoming) != own:
        raise FedanomError("the global adapter does not fit this merchant's backbone (tensor names differ)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in incoming:
                param.copy_(incoming[name])
    return model


def _reply_path(merchant: Merchant, this_round: int, arrays: ArrayRecord) -> Path:
    """Where this merchant keeps its answer to one round on one global adapter."""
    digest = hashlib.sha256()
    for name, value in sorted(to_numpy(arrays).items()):
        digest.update(name.encode() + value.tobytes())
    return merchant.state_dir / "replies" / f"round-{this_round}-{digest.hexdigest()[:16]}.npz"


def query(msg: Message, context: Context) -> Message:
    """Whether this merchant holds the announced backbone; with shipped files, install them first."""
    config = msg.content.config_records["config"]
    merchant = Merchant.from_context(context, config)
    expected = text(config, "backbone-hash")
    if "backbone-files" in config and merchant.backbone(expected) is None:
        names, contents = config["backbone-names"], config["backbone-files"]
        assert isinstance(names, list) and isinstance(contents, list)
        files = {
            str(name): data for name, data in zip(names, contents, strict=True) if isinstance(data, bytes)
        }
        try:
            install_backbone(files, expected, merchant.state_dir / "backbones" / expected)
        except FedanomError as exc:
            return failed(msg, BACKBONE_REFUSED, exc)
    has = merchant.backbone(expected) is not None
    return Message(RecordDict({"backbone": ConfigRecord({HAS_BACKBONE: has})}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    merchant = Merchant.from_context(context, config)
    this_round = int(number(config, "server-round") + number(config, "round-offset"))
    incoming = msg.content.array_records["arrays"]
    # A round asked again on the same global adapter (the server restarted before aggregating it) gets
    # the update already released: re-sending it is post-processing and spends no privacy.
    kept = _reply_path(merchant, this_round, incoming)
    if kept.exists():
        with np.load(kept) as saved:
            metrics = MetricRecord({key: float(saved[f"metric:{key}"]) for key in TRAIN_METRICS})
            arrays = {name: saved[name] for name in saved.files if not name.startswith("metric:")}
        return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=msg)
    train_windows, _, _ = merchant.windows()
    model = global_model(merchant, config, incoming)
    # a merchant's known attacks stay out of what the sequence model learns as normal, and train the
    # adapter's anomaly head where the federation's adapter has one
    known = read_labels(merchant.labels, train_windows) if merchant.labels is not None else None
    sent = set(trainable_state(model))
    if known is None:  # nothing to teach the head: it goes back as it came, not moved by DP noise alone
        for name, param in model.named_parameters():
            param.requires_grad_(param.requires_grad and HEAD not in name)
    settings = TrainSettings(
        epochs=number(config, "local-epochs"),
        batch_size=int(number(config, "batch-size")),
        learning_rate=number(config, "learning-rate"),
        max_grad_norm=number(config, "max-grad-norm"),
        seed=this_round if merchant.simulated else None,
        dp=flag(config, "dp"),
    )
    steps = settings.steps_for(train_windows.n_windows)
    rounds_left = int(number(config, "num-server-rounds")) - this_round + 1
    ledger = None  # without DP (simulate's research comparison only) nothing is spent
    if settings.dp:
        ledger = PrivacyLedger.open(
            merchant.state_dir, epsilon_budget=merchant.epsilon, delta=1.0 / train_windows.n_windows
        )
    try:
        report = train_model(
            model,
            train_windows,
            settings,
            labels=known,
            ledger=ledger,
            planned_steps=rounds_left * steps,
        )
    except BudgetExhausted as exc:
        return failed(msg, BUDGET_EXHAUSTED, exc)
    values: Metrics = {
        "num-examples": float(train_windows.n_windows),
        "train-loss": report.mean_loss,
        "epsilon": report.epsilon_spent or 0.0,
        "train-seconds": report.seconds,
    }
    update = {name: p.detach().cpu().numpy() for name, p in model.named_parameters() if name in sent}
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.savez(kept, **update, **{f"metric:{k}": np.float64(v) for k, v in values.items()})  # type: ignore[arg-type]
    return Message(RecordDict({"arrays": to_record(update), "metrics": MetricRecord(values)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the merchant's validation sessions with the global adapter, and keep that global detector,
    calibrated on them, in the state directory for `fedanom score`."""
    config = msg.content.config_records["config"]
    merchant = Merchant.from_context(context, config)
    train_windows, validation, popularity = merchant.windows()
    model = global_model(merchant, config, msg.content.array_records["arrays"])
    detector = BehaviourDetector(
        model,
        backbone_dir=merchant.require_backbone(config),
        popularity=popularity,
        lora=lora_settings(config),
        session=SessionConfig(),
        aggregation=DEFAULT_AGGREGATION,
        provenance={
            "federated_round": int(number(config, "server-round") + number(config, "round-offset")),
            "epsilon": PrivacyLedger.spent_in(merchant.state_dir),
            "noise": "seeded" if merchant.simulated else "os-entropy",  # of this merchant's own updates
        },
    )
    # known attacks choose the score aggregation and are left out of the threshold, as in `fedanom train`
    known = read_labels(merchant.labels, validation) if merchant.labels is not None else None
    score_head = config.get(SCORE_HEAD, True)
    if not isinstance(score_head, bool):
        raise FedanomError(f"config value '{SCORE_HEAD}' must be true or false, not {score_head!r}")
    normal = train_windows
    if merchant.labels is not None:  # the feature reference describes the shop's normal sessions
        trained_on = read_labels(merchant.labels, train_windows)
        normal = train_windows.select(trained_on == 0)
        # a merchant whose own training period holds enough known attacks checks the head on them: in a
        # federation of unlike shops the others' word fitted it badly (BENCHMARKS.md, session 10)
        own_word = detector.head_helps(train_windows, trained_on, normal)
        score_head = score_head if own_word is None else own_word
    surprise = detector.calibrate(validation, known, ALERT_RATE, training=normal, score_head=score_head)
    values: Metrics = {"num-examples": validation.n_windows, "val-surprise": float(np.mean(surprise.event))}
    if known is not None and 0 < known.sum() < len(known):
        scores = detector.combine(surprise, validation)
        values["val-auroc"] = float(roc_auc_score(known, scores))
        values["val-auprc"] = float(average_precision_score(known, scores))
        head_check = detector.head_auprc(surprise, validation, known)
        if head_check is not None:
            values["val-auprc-with-head"], values["val-auprc-without-head"] = head_check
    detector.save(merchant.state_dir / "detector")
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def failed(msg: Message, code: int, exc: Exception) -> Message:
    """A failure reply: the code and its fixed words leave the merchant; the details go to its own log."""
    log(ERROR, "%s: %s", FAILURES[code], exc)
    return Message(Error(code=code, reason=FAILURES[code]), reply_to=msg)


def answering(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """The handler, with anything it raises answered by a fixed failure code instead of Flower's own
    reply, which would carry the exception's text (a bad row, a file path) to the server."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedanomError as exc:
            return failed(msg, MERCHANT_SETUP, exc)
        except Exception as exc:
            log(ERROR, "%s", traceback.format_exc())
            return failed(msg, MERCHANT_FAILED, exc)

    return wrapped


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The merchant's ClientApp (with Flower mods around it, e.g. a test's message recorder)."""
    client_app = ClientApp(mods=list(mods))
    client_app.query()(answering(query))
    client_app.train()(answering(train))
    client_app.evaluate()(answering(evaluate))
    return client_app


app = make_client_app()
