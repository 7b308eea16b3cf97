"""A merchant's warm worker: one long-lived process, started by `fedanom client`, that holds the model
stack in memory and does each round's model work for the ClientApp processes Flower starts per message.

Flower 1.41 starts a fresh `flwr-clientapp` process for every message and has no warm ClientApp. Torch,
transformers, peft and Opacus take 5-7 s to import here, twice a round, before a step is taken
(BENCHMARKS.md, federation). The ClientApp (`client.app`) therefore hands a train or evaluate message to
this worker over a Unix socket in the merchant's state directory and replies with what comes back. The
worker runs the same `client.rounds` functions the ClientApp would run itself, on the same disk state
(ledger, prepared data, kept replies), so nothing about a round changes but its start-up. Where no worker
listens (a simulation, a worker that failed to start or has gone) the ClientApp does the work in its
own process. A worker that dies during a request fails that message (MERCHANT_FAILED): trying again
in-process could spend the privacy budget twice.

The socket is the merchant's own (in its state directory, no access for group or others) and every
connection must prove it holds the key in `worker.key` (0600, new each start). Requests are data only:
JSON and numpy arrays read without pickle. `fedanom client` starts and stops it
(`client.supernode.warm_worker`); it stops on its own if that process dies.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedanom.client.merchant import Merchant
from fedanom.client.supernode import WORKER_KEY as KEY
from fedanom.client.supernode import WORKER_SOCKET as SOCKET
from fedanom.common.errors import BudgetExhausted, FedanomError
from fedanom.common.policy import PolicyRefused
from fedanom.common.records import Metrics, to_numpy, to_record

MAX_REQUEST_BYTES = 1 << 30  # an adapter is kilobytes; a bound keeps a bad sender from exhausting memory
# what the worker answers instead of a result, and the exception the ClientApp raises for it
FAILED_AS = {"budget": BudgetExhausted, "policy": PolicyRefused, "setup": FedanomError}

log = logging.getLogger(__name__)
Result = tuple[dict[str, np.ndarray], Metrics]


def train(merchant: Merchant, config: Mapping[str, object], arrays: ArrayRecord, this_round: int) -> Result:
    """`rounds.train_round` in the merchant's worker if one answers, else in this process."""
    request = {"kind": "train", "config": dict(config), "round": this_round}
    return _ask(merchant, request, arrays) or _work(merchant, request, arrays)


def evaluate(merchant: Merchant, config: Mapping[str, object], arrays: ArrayRecord) -> Metrics:
    """`rounds.evaluate_round` in the merchant's worker if one answers, else in this process."""
    request = {"kind": "evaluate", "config": dict(config)}
    return (_ask(merchant, request, arrays) or _work(merchant, request, arrays))[1]


def _work(merchant: Merchant, request: Mapping[str, Any], arrays: ArrayRecord) -> Result:
    """The request's model work, in this process (the worker's, or a ClientApp's where none answers)."""
    from fedanom.client import rounds  # the model stack: every message is a fresh process

    if request["kind"] == "train":
        return rounds.train_round(merchant, request["config"], arrays, int(request["round"]))
    return {}, rounds.evaluate_round(merchant, request["config"], arrays)


def _ask(merchant: Merchant, request: dict[str, Any], arrays: ArrayRecord) -> Result | None:
    """The worker's answer, or None when no worker of this merchant's is listening."""
    address, key = merchant.state_dir / SOCKET, merchant.state_dir / KEY
    if merchant.simulated:
        return None
    if not address.exists():
        log.warning("no worker of this merchant's is listening; working in this process")
        return None
    try:
        connection = Client(str(address), family="AF_UNIX", authkey=key.read_bytes())
    except (OSError, AuthenticationError) as exc:  # gone, or restarting: do the work here
        log.warning("the merchant's worker did not answer (%s); working in this process", exc)
        return None
    merchant_fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(merchant).items()}
    with connection:
        _send(connection, {**request, "merchant": merchant_fields}, to_numpy(arrays))
        header, update = _receive(connection)
    if "failed" in header:
        raise FAILED_AS.get(header["failed"], RuntimeError)(header["reason"])
    return update, header["metrics"]


def _send(connection: Connection, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stubs miss the keyword form
    connection.send_bytes(json.dumps(header, default=float).encode())  # numpy scalars as plain numbers
    connection.send_bytes(buffer.getvalue())


def _receive(connection: Connection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = json.loads(connection.recv_bytes(MAX_REQUEST_BYTES))
    with np.load(io.BytesIO(connection.recv_bytes(MAX_REQUEST_BYTES)), allow_pickle=False) as saved:
        return header, {name: saved[name] for name in saved.files}


def serve(state_dir: Path) -> None:
    """Import the model stack, then answer the ClientApp processes' requests one at a time, for ever."""
    from fedanom.client import rounds  # noqa: F401  # before it listens: its import is the cold start it saves

    state_dir.mkdir(parents=True, exist_ok=True)
    address, key_file = state_dir / SOCKET, state_dir / KEY
    address.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    key_file.unlink(missing_ok=True)
    os.umask(0o077)  # the key and the socket are the merchant's own from their first byte
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as fh:
        fh.write(key)
    with Listener(str(address), family="AF_UNIX", authkey=key) as listener:
        log.info("ready at %s", address)
        while True:
            try:
                connection = listener.accept()
            except (OSError, AuthenticationError, EOFError) as exc:
                log.warning("refused a connection: %s", exc)
                continue
            with connection:
                _answer(connection)


def _answer(connection: Connection) -> None:
    """One request, answered with a result or with why it failed (the ClientApp maps that to its code)."""
    started, request = time.perf_counter(), dict[str, Any]()
    try:
        request, arrays = _receive(connection)
        merchant = Merchant(**_merchant_fields(request["merchant"]))
        update, metrics = _work(merchant, request, to_record(arrays))
        header: dict[str, Any] = {"metrics": dict(metrics)}
    except BudgetExhausted as exc:
        header, update = {"failed": "budget", "reason": str(exc)}, {}
    except PolicyRefused as exc:
        header, update = {"failed": "policy", "reason": str(exc)}, {}
    except FedanomError as exc:
        header, update = {"failed": "setup", "reason": str(exc)}, {}
    except Exception as exc:  # its traceback goes to this merchant's log only
        log.exception("the worker failed a request")
        header, update = {"failed": "failed", "reason": f"{type(exc).__name__}: {exc}"}, {}
    log.info("answered the %s message in %.1f s", request.get("kind", "?"), time.perf_counter() - started)
    with contextlib.suppress(OSError):  # the ClientApp process is gone (Flower timed it out)
        _send(connection, header, update)


def _merchant_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    paths = ("data", "state_dir", "base", "labels")
    return {k: Path(v) if k in paths and v is not None else v for k, v in fields.items()}


def _exit_with(parent: int) -> None:
    """Stop when the process that started this worker is gone (killed without a chance to stop it)."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(1.0)


def _stop(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # closing the listener on the way out removes its socket


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedanom worker: %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    threading.Thread(target=_exit_with, args=(int(sys.argv[2]),), daemon=True).start()
    serve(Path(sys.argv[1]))
