"""The merchant's Flower ClientApp: one round of local DP training on the global adapter.

ClientApps are stateless, so everything that must last lives in the merchant's state directory: the
privacy ledger (ε accumulates across rounds and runs) and the latest global detector, calibrated on the
merchant's own validation sessions and ready for `fedanom score`. Only the adapter's trained tensors and
the whitelisted metrics below leave the merchant, or a failure's fixed code and words (`FAILURES`).

The merchant is described by the SuperNode's node config (`data`, `preset`, `state-dir`, `epsilon`, and
optionally `base` and `labels`: its known attacks, which train the adapter's anomaly head when the run
has one); in simulation, by the simulation's resolver from the node's partition id (`client.merchant`).
Everything else arrives with each round's message, so simulation and deployment behave alike. Flower
starts a fresh ClientApp process for every message, so the handlers import the model stack
(`client.rounds`) only where they use it: a backbone query or a round asked again costs no torch import.
The backbone is found by the content hash the server announces: the merchant's own `base` if it matches,
else one the server shipped earlier into `<state-dir>/backbones/<hash>` (`query`).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Sequence
from logging import ERROR

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import log

from fedanom.client import worker
from fedanom.client.merchant import Merchant, Resolver, kept_reply
from fedanom.common.backbone import install_backbone
from fedanom.common.errors import BudgetExhausted, FedanomError
from fedanom.common.policy import PolicyRefused
from fedanom.common.records import (
    BACKBONE_REFUSED,
    BUDGET_EXHAUSTED,
    EVALUATE_METRICS,
    FAILURES,
    HAS_BACKBONE,
    MERCHANT_FAILED,
    MERCHANT_SETUP,
    POLICY_REFUSED,
    TRAIN_METRICS,
    number,
    text,
    to_record,
)

# The only metrics a merchant reports (a test checks every outgoing message against this list).
METRIC_KEYS = (*TRAIN_METRICS, *EVALUATE_METRICS)


def query(msg: Message, context: Context, merchants: Resolver = Merchant.from_node) -> Message:
    """Whether this merchant holds the announced backbone; with shipped files, install them first."""
    config = msg.content.config_records["config"]
    merchant = merchants(context)
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


def train(msg: Message, context: Context, merchants: Resolver = Merchant.from_node) -> Message:
    config = msg.content.config_records["config"]
    merchant = merchants(context)
    this_round = int(number(config, "server-round") + number(config, "round-offset"))
    incoming = msg.content.array_records["arrays"]
    # A round asked again on the same global adapter (the server restarted before aggregating it) gets
    # the update already released: re-sending it is post-processing and spends no privacy.
    kept = merchant.reply_path(this_round, incoming)
    if kept.exists():
        update, values = kept_reply(kept, TRAIN_METRICS)
    else:
        try:
            update, values = worker.train(merchant, config, incoming, this_round)  # keeps the reply
        except BudgetExhausted as exc:
            return failed(msg, BUDGET_EXHAUSTED, exc)
        except PolicyRefused as exc:
            return failed(msg, POLICY_REFUSED, exc)
    return Message(RecordDict({"arrays": to_record(update), "metrics": MetricRecord(values)}), reply_to=msg)


def evaluate(msg: Message, context: Context, merchants: Resolver = Merchant.from_node) -> Message:
    """Score the merchant's validation sessions with the global adapter and keep that detector."""
    config = msg.content.config_records["config"]
    values = worker.evaluate(merchants(context), config, msg.content.array_records["arrays"])
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


def make_client_app(mods: Sequence[Mod] = (), merchants: Resolver = Merchant.from_node) -> ClientApp:
    """The merchant's ClientApp (with Flower mods around it, e.g. a test's message recorder); a simulation
    names its virtual merchants with `merchants`, so no message has to carry their data."""
    client_app = ClientApp(mods=list(mods))
    client_app.query()(answering(functools.partial(query, merchants=merchants)))
    client_app.train()(answering(functools.partial(train, merchants=merchants)))
    client_app.evaluate()(answering(functools.partial(evaluate, merchants=merchants)))
    return client_app


app = make_client_app()
