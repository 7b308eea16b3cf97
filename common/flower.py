"""Starting Flower's own processes (SuperLink, SuperNode, `flwr run`) the way fedanom needs them, and
keeping Flower's log lines in a file while fedanom's own progress display holds the console.

Flower's processes launch further Flower executables by name, so they run with this environment's
`bin` first on PATH. Outside loopback, TLS is required unless the operator insists on `--insecure`, which
is allowed with a loud warning. Each is stopped with every process it started, also when fedanom itself
is told to stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, TextIO

import psutil

from fedanom.common.errors import FedanomError

FLOWER_BIN = Path(sys.executable).parent
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


# Flower's SuperExec (which starts the ServerApp and each message's ClientApp) looks for new work once a
# second unless told otherwise; a round waits on it at every hop (BENCHMARKS.md, federation). Ten looks a
# second cost nothing measurable here. The SuperNode's own 3 s wait when idle is fixed in Flower 1.41.
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def flower_environment(**extra: str) -> dict[str, str]:
    env = {**SUPEREXEC_POLL, **os.environ}  # an operator's own setting wins
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


EPHEMERAL_LOW = 32_768  # where Linux starts outgoing connections source ports (unless /proc says otherwise)
PORTS_BELOW_EPHEMERAL = 12_000  # how far below that range a free port is drawn
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for local SuperNodes, tests, benchmarks).
    Drawn at random below the kernel's ephemeral range: a port the kernel chose (bind to 0) comes from the
    range every outgoing connection takes its source port from, and one did take a SuperNode's port
    between the pick and the bind (a test run's 'address already in use')."""
    low = _ephemeral_low()
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(max(1_024, low - PORTS_BELOW_EPHEMERAL), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # that whole stretch is taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return EPHEMERAL_LOW


def wait_for_port(host: str, port: int, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise FedanomError(f"{what} did not start listening on {host}:{port} within {seconds:.0f} s")


def own_flower_processes() -> None:
    """Stop what this process starts from outliving it, also when it is told to stop.

    SIGTERM (`kill`, a service manager) becomes SystemExit, so `finally` blocks run; and on Linux this
    process becomes the subreaper of everything it starts, so a process whose parent dies (the
    `flwr-clientapp` of a SuperNode that crashed, the `flower-superexec` and `flwr-serverapp` that the
    SuperLink starts in a session of their own) is re-parented here, where `stop_descendants` finds it,
    instead of running on for minutes under init."""

    def leave(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_descendants(seconds: float = 30.0, keep: Collection[int] = ()) -> None:
    """Ask every process this one started (and, after `own_flower_processes`, their orphans) but those
    in `keep` to stop, wait, kill what is left; again until none is left, as a stopping process may
    start another."""
    for _ in range(5):
        tree = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
        if not tree:
            return
        for member in tree:
            with contextlib.suppress(psutil.Error):
                member.terminate()
        _, alive = psutil.wait_procs(tree, timeout=seconds)
        for member in alive:
            with contextlib.suppress(psutil.Error):
                member.kill()
        psutil.wait_procs(alive, timeout=5)


def run_to_end(command: list[str], keep: Collection[int] = (), **popen: Any) -> int:
    """Run a Flower command to its end, and its exit code; then, or when stopped early, stop whatever it
    started and left behind (and any other process of ours but those in `keep`)."""
    try:
        return subprocess.Popen(command, **popen).wait()
    finally:
        stop_descendants(keep=keep)


@contextlib.contextmanager
def flower_logs_to(path: Path) -> Iterator[None]:
    """Flower's log lines go to `path` instead of the console while the block runs (it logs every line
    to its own console handler and again through the root logger's). The caller names the file."""
    flower = logging.getLogger("flwr")
    saved = flower.handlers[:], flower.propagate
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    flower.handlers, flower.propagate = [to_file], False
    try:
        yield
    finally:
        flower.handlers, flower.propagate = saved
        to_file.close()


@contextlib.contextmanager
def flower_output(path: Path, *, verbose: bool) -> Iterator[TextIO]:
    """Where Flower's processes (SuperLink, SuperNode, their apps) write: `path`, appended to, or with
    --verbose the console."""
    if verbose:
        yield sys.stderr
        return
    with open(path, "a") as log:
        yield log
