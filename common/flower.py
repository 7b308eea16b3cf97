"""Starting Flower's own processes (SuperLink, SuperNode, `flwr run`) the way fedanom needs them.

Flower's processes launch further Flower executables by name, so they run with this environment's
`bin` first on PATH. Outside loopback, TLS is required unless the operator insists on `--insecure`, which
is allowed with a loud warning. Each is stopped with every process it started, also when fedanom itself
is told to stop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from fedanom.common.errors import FedanomError

FLOWER_BIN = Path(sys.executable).parent


def flower_environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{FLOWER_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedanomError(f"address '{address}' must look like HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(host: str, *, insecure: bool, has_certificates: bool) -> bool:
    """Whether to run without TLS; refuses plain text outside loopback unless asked for explicitly."""
    if has_certificates:
        return False
    if is_loopback(host):
        return True
    if not insecure:
        raise FedanomError(
            f"{host} is not a loopback address: give TLS certificates (deploy/generate-certificates.sh makes "
            "them) or pass --insecure to send merchants' updates in plain text"
        )
    print(
        f"WARNING: running WITHOUT TLS on {host}: updates and metrics cross the network as plain text",
        file=sys.stderr,
    )
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for local SuperNodes, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise FedanomError(f"{what} did not start listening on {host}:{port} within {seconds:.0f} s")


def stop_tree(process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    """Stop a Flower process and every process it started. The SuperLink starts `flower-superexec` in a
    session of its own, and that starts `flwr-serverapp`: stopping the SuperLink alone left them running
    for minutes."""
    try:
        leader = psutil.Process(process.pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=seconds)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def run_tree(command: list[str], **popen: Any) -> int:
    """Run a Flower command to its end, and its exit code. Stopped early (an exception, or SIGTERM through
    `exit_on_sigterm`), it is stopped with every process it started."""
    process = subprocess.Popen(command, **popen)
    try:
        return process.wait()
    finally:
        if process.poll() is None:
            stop_tree(process)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (`kill`, a service manager) into SystemExit, so `finally` blocks stop what this
    process started instead of leaving it running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
