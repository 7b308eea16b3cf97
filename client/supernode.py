"""A merchant's Flower SuperNode, as `fedanom client` runs it: who the merchant is goes into the node
config (`client.merchant` reads it in every ClientApp process), and the SuperNode is started again
while the SuperLink is unreachable or has not admitted the node's key yet, until the merchant gives up.
Flower's own log lines (the SuperNode's and its ClientApp processes') go to `<state-dir>/supernode.log`,
with those of the merchant's warm worker (`client.worker`), which lives as long as the SuperNode's
retries; the console keeps fedanom's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import tomli_w

from fedanom.common.backbone import backbone_hash
from fedanom.common.errors import FedanomError
from fedanom.common.flower import (
    check_transport,
    flower_environment,
    flower_output,
    own_flower_processes,
    run_to_end,
    split_address,
)
from fedanom.common.labels import load_label_table

RETRY_SECONDS = 5.0  # between attempts to (re)join, when the SuperNode itself gives up
WORKER_START_TIMEOUT_S = 120.0  # for the warm worker to import the model stack and listen
STOP_TIMEOUT_S = 10.0  # for the warm worker to stop before it is killed
WORKER_SOCKET = "worker.sock"  # in the state directory: where the warm worker listens
WORKER_KEY = "worker.key"  # in the state directory: the secret a connection to it must prove


@dataclass(frozen=True)
class SuperNode:
    server: str
    port: int  # of the SuperNode's own runtime API
    root_certificates: Path | None  # None: plain text
    auth_key: Path | None  # its private key, when the operator authenticates nodes
    threads: int  # CPU threads of its ClientApp processes; 0: PyTorch's default

    def command(self, node_config: Path) -> list[str]:
        command = ["flower-supernode", "--superlink", self.server, "--port", str(self.port)]
        command += ["--node-config", str(node_config)]
        if self.root_certificates is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.root_certificates)]
        if self.auth_key is not None:
            command += ["--auth-supernode-private-key", str(self.auth_key)]
        return command

    def run(
        self, node_config: dict[str, str | float], state_dir: Path, give_up_after: float, *, verbose: bool
    ) -> None:
        """Run until the federation ends or the merchant presses Ctrl-C; retry while it cannot join.
        Flower's log goes to <state-dir>/supernode.log, or with `verbose` to the console."""
        # Flower reads a node config from a TOML file whole: no quoting of the merchant's paths
        config_file = state_dir / "node-config.toml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(tomli_w.dumps(node_config))
        # The ClientApp processes the SuperNode starts inherit this; more threads than cores make DP-SGD's
        # many small operations spin rather than compute.
        threads = {"OMP_NUM_THREADS": str(self.threads)} if self.threads > 0 else {}
        environment = flower_environment(**threads)
        own_flower_processes()
        log_path = state_dir / "supernode.log"
        if not verbose:
            print(f"Flower's log: {log_path}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + give_up_after
        with (
            flower_output(log_path, verbose=verbose) as log,
            warm_worker(state_dir, environment, log) as warm,
        ):
            while True:
                code = run_to_end(
                    self.command(config_file),
                    keep={warm.pid},
                    env=environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                if code in (0, -2, 130):  # finished, or the merchant pressed Ctrl-C
                    return
                if time.monotonic() >= deadline:
                    raise FedanomError(f"the SuperNode kept stopping (last exit code {code}); gave up")
                print(
                    f"the SuperNode stopped (exit code {code}): the SuperLink is unreachable or has not "
                    f"admitted this node's key yet (see {log_path}); trying again in {RETRY_SECONDS:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(RETRY_SECONDS)


def join_federation(
    node_config: dict[str, str | float],
    *,
    events: int,
    server: str,
    port: int,
    root_certificates: Path | None,
    insecure: bool,
    auth_key: Path | None,
    threads: int,
    give_up_after: float,
    say: Callable[[str], None],
    verbose: bool = False,
) -> None:
    """`fedanom client` once the merchant's data is prepared: every file it names checked before it
    joins (a mistake is one sentence now, not a failed round later), then the SuperNode run."""
    state_dir = Path(str(node_config["state-dir"]))
    if node_config["base"]:
        backbone_hash(Path(str(node_config["base"])))
    if node_config["labels"]:
        load_label_table(Path(str(node_config["labels"])))
    if auth_key is not None and not auth_key.is_file():
        raise FedanomError(f"--auth-key {auth_key} does not exist")
    host, _ = split_address(server)
    plain = check_transport(host, insecure=insecure, has_certificates=root_certificates is not None)
    node = SuperNode(server, port, None if plain else root_certificates, auth_key, threads)
    from fedanom.common.detector.privacy import PrivacyLedger  # the model stack, once the files are good

    say(
        f"joining the federation at {server} with {events:,} events of {Path(str(node_config['data'])).name};"
        f" privacy budget ε={node_config['epsilon']:g}, spent so far {PrivacyLedger.spent_in(state_dir):.2f}"
    )
    node.run(node_config, state_dir, give_up_after, verbose=verbose)


@contextlib.contextmanager
def warm_worker(
    state_dir: Path, environment: Mapping[str, str], output: TextIO
) -> Iterator[subprocess.Popen[bytes]]:
    """The merchant's warm worker (`client.worker`), for as long as the block runs; the block starts once
    it listens (or has failed to start: every message then works in its own process)."""
    state_dir = state_dir.resolve()  # the ClientApp connects by the absolute path
    worker = subprocess.Popen(
        [sys.executable, "-m", "fedanom.client.worker", str(state_dir), str(os.getpid())],
        env=dict(environment),
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while not (state_dir / WORKER_SOCKET).exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
