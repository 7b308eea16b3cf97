"""A federated run's checkpoints: a round is complete once `<run-dir>/round-<k>/` holds its metrics and
then its global adapter; its JSON line (training and evaluation, per merchant and combined) is then
appended to `<run-dir>/rounds.jsonl`. A restarted run with `resume` continues after its last completed
round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedanom.server.aggregation import Arrays


def write_round(run_dir: Path, completed_round: int, record: dict[str, Any], arrays: Arrays) -> None:
    """The round is complete: its metrics, then its adapter (the mark of completion), then its line."""
    target = run_dir / f"round-{completed_round}"
    target.mkdir(parents=True, exist_ok=True)
    summary = {**record, "time": time.time()}
    (target / "metrics.json").write_text(json.dumps(summary, indent=1))
    np.savez(target / "adapter.npz", **arrays)  # type: ignore[arg-type]  # names are keywords
    with open(run_dir / "rounds.jsonl", "a") as fh:
        fh.write(json.dumps(summary) + "\n")


def last_checkpoint(run_dir: Path) -> tuple[int, Arrays] | None:
    """The last completed round and its global adapter, if this run has checkpoints."""
    rounds = sorted(
        (int(p.name.split("-")[1]), p) for p in run_dir.glob("round-*") if (p / "adapter.npz").exists()
    )
    if not rounds:
        return None
    k, path = rounds[-1]
    with np.load(path / "adapter.npz") as data:
        return k, {name: data[name] for name in data.files}


def rewrite_round_log(run_dir: Path, completed: int) -> None:
    """rounds.jsonl as one line per completed round, from the checkpoints (a killed run may have left
    a round half-written); a fresh run starts an empty log."""
    lines = [
        json.dumps(json.loads((run_dir / f"round-{k}" / "metrics.json").read_text()))
        for k in range(1, completed + 1)
        if (run_dir / f"round-{k}" / "metrics.json").exists()
    ]
    (run_dir / "rounds.jsonl").write_text("".join(line + "\n" for line in lines))


class RoundProgress:
    """One console line per completed round, read from rounds.jsonl while `flwr run` works in other
    processes: which round of how many, what became of the merchants' updates, the time so far and
    about how much is left (at this run's pace so far)."""

    def __init__(self, run_dir: Path, total: int, echo: Callable[[str], None]) -> None:
        self.log, self.total, self.echo = run_dir / "rounds.jsonl", total, echo
        self.started = time.monotonic()
        self.seen = len(self._complete_lines())  # a resumed run's earlier rounds are not news
        self.new = 0

    def _complete_lines(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return text.split("\n")[:-1]  # a line still being written has no newline yet

    def __call__(self) -> None:
        lines = self._complete_lines()
        self.seen = min(self.seen, len(lines))  # a resumed run rewrites the log to its checkpoints
        for line in lines[self.seen :]:
            record = json.loads(line)
            self.new += 1
            elapsed = time.monotonic() - self.started
            left = elapsed / self.new * (self.total - record["round"])
            failed = sorted({failure["reason"] for failure in record["failed"]})
            self.echo(
                f"round {record['round']} of {self.total}: {len(record['accepted'])} updates accepted, "
                f"{len(record['rejected'])} rejected, {len(record['failed'])} "
                f"merchant{'s' * (len(record['failed']) != 1)} failed"
                + (f" ({', '.join(failed)})" if failed else "")
                + f"; {_duration(elapsed)} so far"
                + (f", about {_duration(left)} left" if record["round"] < self.total else "")
            )
        self.seen = len(lines)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
