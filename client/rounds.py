"""A merchant's model work in one round: DP-train the global adapter on its sessions, or evaluate it and
keep it, calibrated, as the merchant's detector. The ClientApp's handlers (`client.app`) call these.

Only the adapter's trained tensors and the metrics returned here leave the merchant; the handlers reply
with them. The merchant's known attacks (`labels`) stay out of what the sequence model learns as normal,
train the adapter's anomaly head where the federation's adapter has one, and measure the global
detector on the merchant's validation sessions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from sklearn.metrics import average_precision_score, roc_auc_score

from fedanom.client.merchant import Merchant, keep_reply
from fedanom.common.detector.artifact import load_backbone
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.model import HEAD, attach_lora, trainable_state
from fedanom.common.detector.privacy import PrivacyLedger, UnitMismatch
from fedanom.common.detector.scoring import DEFAULT_AGGREGATION
from fedanom.common.detector.training import privacy_units, train_model
from fedanom.common.errors import FedanomError
from fedanom.common.labels import read_labels
from fedanom.common.policy import PolicyRefused, PrivacyPolicy
from fedanom.common.records import SCORE_HEAD, USER_LEVEL, Metrics, flag, lora_settings, number, text
from fedanom.common.sessions import SessionConfig
from fedanom.common.settings import ALERT_RATE, TrainSettings


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


def train_round(
    merchant: Merchant, config: Mapping[str, object], incoming: ArrayRecord, this_round: int
) -> tuple[dict[str, np.ndarray], Metrics]:
    """The merchant's DP update of the global adapter and its training metrics; raises BudgetExhausted
    when its ledger cannot pay for the round."""
    policy, dp = PrivacyPolicy.from_config(config), flag(config, "dp")
    refusal = policy.refusal(dp=dp, epsilon_budget=merchant.epsilon, delta=None)
    if refusal:  # before its data is read: a merchant that may not train spends nothing
        raise PolicyRefused(refusal)
    train_windows, _, _ = merchant.windows()
    model = global_model(merchant, config, incoming)
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
        dp=dp,
        privacy_unit=text(config, "privacy-unit", "session"),  # a server of an earlier version: sessions
        max_windows_per_user=int(number(config, "max-windows-per-user"))
        if "max-windows-per-user" in config  # a server of an earlier version sends no unit
        else TrainSettings.max_windows_per_user,
    )
    units = privacy_units(train_windows, settings)
    rounds_left = int(number(config, "num-server-rounds")) - this_round + 1
    ledger = None  # without DP (simulate's research comparison only) nothing is spent
    if settings.dp:
        try:
            ledger = PrivacyLedger.open(
                merchant.state_dir,
                epsilon_budget=merchant.epsilon,
                delta=1.0 / units,
                unit=settings.privacy_unit,
            )
        except UnitMismatch as exc:  # the federation's unit is not the one this merchant's ε was spent in
            raise PolicyRefused(str(exc)) from None
        refusal = policy.refusal(dp=dp, epsilon_budget=merchant.epsilon, delta=ledger.delta)
        if refusal:
            raise PolicyRefused(refusal)
    report = train_model(
        model,
        train_windows,
        settings,
        labels=known,
        ledger=ledger,
        planned_steps=rounds_left * settings.steps_for(units),
    )
    values: Metrics = {
        "num-examples": float(train_windows.n_windows),
        "train-loss": report.mean_loss,
        "epsilon": report.epsilon_spent or 0.0,
        "train-seconds": report.seconds,
        "epsilon-budget": merchant.epsilon if ledger is not None else 0.0,
        "delta": ledger.delta if ledger is not None else 0.0,
        "noise-multiplier": report.noise_multiplier or 0.0,
        "sample-rate": report.sample_rate or 0.0,
        "steps": float(report.steps),
        USER_LEVEL: float(ledger is not None and ledger.unit == "user"),
    }
    update = {name: p.detach().cpu().numpy() for name, p in model.named_parameters() if name in sent}
    # kept before it is sent, wherever this runs: a round asked again gets it back without new spending
    keep_reply(merchant.reply_path(this_round, incoming), update, values)
    return update, values


def evaluate_round(merchant: Merchant, config: Mapping[str, object], arrays: ArrayRecord) -> Metrics:
    """Score the merchant's validation sessions with the global adapter, and keep that global detector,
    calibrated on them, in the state directory for `fedanom score`."""
    train_windows, validation, popularity = merchant.windows()
    model = global_model(merchant, config, arrays)
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
    return values
