"""The operator's federated run on a real Flower SuperLink, the way `fedanom server` starts it.

It writes the Flower app (a pyproject naming fedanom's installed ServerApp and ClientApp) and a Flower
CLI connection under the run directory, starts `flower-superlink`, admits the merchants' node keys,
launches the run with `flwr run` (so `flwr ls` / `flwr log` work against it with
FLWR_HOME=<run-dir>/flwr-home), waits for it and stops the SuperLink with everything it started.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tomli_w

from fedanom.common.backbone import backbone_hash
from fedanom.common.errors import FedanomError
from fedanom.common.flower import (
    check_transport,
    flower_environment,
    flower_output,
    own_flower_processes,
    split_address,
    stop_descendants,
    wait_for_port,
)
from fedanom.common.policy import PrivacyPolicy
from fedanom.common.settings import RUN_DEFAULTS, RunSettings
from fedanom.server.checkpoints import RoundProgress

CONNECTION = "fedanom"
RunConfig = dict[str, bool | float | int | str]


def app_pyproject() -> str:
    """The Flower app `flwr run` ships: fedanom's components, from the installed package."""
    return tomli_w.dumps(
        {
            "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
            "project": {"name": "fedanom-federation", "version": "0.1.0", "dependencies": []},
            "tool": {
                "flwr": {
                    "app": {
                        "publisher": "fedanom",
                        "components": {
                            "serverapp": "fedanom.server.app:app",
                            "clientapp": "fedanom.client.app:app",
                        },
                        "config": RUN_DEFAULTS,
                    }
                }
            },
        }
    )


@dataclass(frozen=True)
class Listener:
    """Where the SuperLink listens, and its TLS files (None: plain text)."""

    host: str
    port: int
    certificates: Path | None

    @property
    def connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    def command(self, run_dir: Path, *, authenticate_nodes: bool) -> list[str]:
        link = ["flower-superlink", "--host", self.host, "--port", str(self.port)]
        link += ["--database", str(run_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.certificates is None:
            link.append("--insecure")
        else:
            link += ["--ssl-ca-certfile", str(self.certificates / "ca.crt")]
            link += ["--ssl-certfile", str(self.certificates / "server.pem")]
            link += ["--ssl-keyfile", str(self.certificates / "server.key")]
        return link + (["--enable-supernode-auth"] if authenticate_nodes else [])

    def cli_config(self) -> str:
        """The Flower CLI's connection to this SuperLink (`flwr run`, `flwr ls`, `flwr log`)."""
        connection: dict[str, str | bool] = {"address": f"{self.connect_host}:{self.port}"}
        if self.certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.certificates.resolve() / "ca.crt")
        return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})


def register_node(public_key: Path, env: dict[str, str], log: IO[str]) -> None:
    """Admit one merchant's SuperNode key (`flwr supernode register`); a key already admitted is fine."""
    command = ["flwr", "supernode", "register", str(public_key.resolve()), CONNECTION]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write(result.stdout + result.stderr)
    log.flush()
    if result.returncode != 0 and "already" not in (result.stdout + result.stderr).lower():
        raise FedanomError(f"the SuperLink refused the node key {public_key}; see {log.name}")


def run_on_superlink(
    listener: Listener,
    run_dir: Path,
    values: RunConfig,
    node_keys: list[Path],
    watch: Callable[[], None],
    *,
    verbose: bool = False,
) -> int:
    """The whole run on a fresh SuperLink; its log goes to <run-dir>/superlink.log (with `verbose`, to
    the console). `flwr run`'s exit code. `watch` is called every second while the run lasts (the
    console's round progress), and once after."""
    (run_dir / "app").mkdir(parents=True, exist_ok=True)
    (run_dir / "app" / "pyproject.toml").write_text(app_pyproject())
    home = run_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(listener.cli_config())
    # `flwr run` reads a run config from a TOML file whole: no quoting of paths on a command line
    run_config = run_dir / "app" / "run-config.toml"
    run_config.write_text(tomli_w.dumps(values))
    env = flower_environment(FLWR_HOME=str(home))
    own_flower_processes()
    with flower_output(run_dir / "superlink.log", verbose=verbose) as log:
        try:
            link = listener.command(run_dir, authenticate_nodes=bool(node_keys))
            subprocess.Popen(link, stdout=log, stderr=subprocess.STDOUT, env=env)
            wait_for_port(listener.connect_host, listener.port, seconds=60, what="the SuperLink")
            for key in node_keys:
                register_node(key, env, log)
            print(
                f"SuperLink on {listener.host}:{listener.port}; waiting for {values['min-nodes']} "
                "merchants (fedanom client)",
                flush=True,
            )
            flwr_run = ["flwr", "run", str(run_dir / "app"), CONNECTION, "--run-config", str(run_config)]
            run = subprocess.Popen([*flwr_run, "--stream"], env=env, stdout=log, stderr=subprocess.STDOUT)
            while run.poll() is None:
                watch()
                time.sleep(1.0)
            watch()
            return run.returncode
        finally:
            stop_descendants()  # the SuperLink, and what it started


def run_server(
    settings: RunSettings,
    *,
    address: str,
    certificates: Path | None,
    insecure: bool,
    node_keys: list[Path],
    echo: Callable[[str], None],
    verbose: bool = False,
) -> str:
    """`fedanom server`: the operator's settings checked before anything starts, the run on a fresh
    SuperLink with its progress on the console, and a one-line summary of what it did."""
    backbone_hash(Path(settings.base))  # a clear error now rather than in every merchant later
    PrivacyPolicy.from_config(settings.to_config())  # a policy that is not one, said now, not in round 1
    host, port = split_address(address)
    plain = check_transport(host, insecure=insecure, has_certificates=certificates is not None)
    for key in node_keys:
        if not key.is_file():
            raise FedanomError(f"--node-key {key} does not exist")
    if node_keys and plain:
        raise FedanomError(
            "--node-key needs TLS: give --certificates (Flower authenticates nodes over TLS only)"
        )
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    listener = Listener(host, port, None if plain else (certificates or Path()).resolve())
    progress = RoundProgress(run_dir, settings.num_server_rounds, echo, resumed=settings.resume)
    finished = run_on_superlink(listener, run_dir, settings.to_config(), node_keys, progress, verbose=verbose)
    rounds_log = run_dir / "rounds.jsonl"
    if finished != 0 or not (run_dir / "global" / "adapter").exists():
        raise FedanomError(f"the federated run did not finish; see {run_dir / 'superlink.log'}")
    done = [json.loads(line) for line in rounds_log.read_text().splitlines()] if rounds_log.exists() else []
    rejected = sum(len(r["rejected"]) for r in done)
    return (
        f"federation finished: {len(done)} rounds, {rejected} updates rejected; "
        f"global adapter in {run_dir / 'global' / 'adapter'}, checkpoints in {run_dir}"
        + ("" if verbose else f"; Flower's log: {run_dir / 'superlink.log'}")
    )
