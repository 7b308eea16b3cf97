"""The operator's federated run on a real Flower SuperLink, the way `fedanom server` starts it.

It writes the Flower app (a pyproject naming fedanom's installed ServerApp and ClientApp) and a Flower
CLI connection under the run directory, starts `flower-superlink`, admits the merchants' node keys,
launches the run with `flwr run` (so `flwr ls` / `flwr log` work against it with
FLWR_HOME=<run-dir>/flwr-home), waits for it and stops the SuperLink with everything it started.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tomli_w

from fedanom.common.errors import FedanomError
from fedanom.common.flower import flower_environment, own_flower_processes, stop_descendants, wait_for_port
from fedanom.common.settings import RUN_DEFAULTS

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
    listener: Listener, run_dir: Path, values: RunConfig, node_keys: list[Path], watch: Callable[[], None]
) -> int:
    """The whole run on a fresh SuperLink; its log goes to <run-dir>/superlink.log. `flwr run`'s exit code.
    `watch` is called every second while the run lasts (the console's round progress), and once after."""
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
    with open(run_dir / "superlink.log", "a") as log:
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
