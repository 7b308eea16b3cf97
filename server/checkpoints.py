"""A federated run's checkpoints: a round is complete once `<run-dir>/round-<k>/` holds its metrics and
then its global adapter; its JSON line (training and evaluation, per merchant and combined) is then
appended to `<run-dir>/rounds.jsonl`. A restarted run with `resume` continues after its last completed
round.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the console's progress reads this module: it must not wait for Flower to load
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


def completed_rounds(run_dir: Path) -> list[int]:
    """The rounds whose checkpoint is complete (their adapter written), in order."""
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("round-*/adapter.npz"))


def last_checkpoint(run_dir: Path) -> tuple[int, Arrays] | None:
    """The last completed round and its global adapter, if this run has checkpoints."""
    rounds = completed_rounds(run_dir)
    if not rounds:
        return None
    with np.load(run_dir / f"round-{rounds[-1]}" / "adapter.npz") as data:
        return rounds[-1], {name: data[name] for name in data.files}


def rewrite_round_log(run_dir: Path, completed: int) -> None:
    """rounds.jsonl as one line per completed round, from the checkpoints (a killed run may have left
    a round half-written); a fresh run starts an empty log."""
    lines = [
        json.dumps(json.loads((run_dir / f"round-{k}" / "metrics.json").read_text()))
        for k in range(1, completed + 1)
        if (run_dir / f"round-{k}" / "metrics.json").exists()
    ]
    partial = run_dir / "rounds.jsonl.partial"
    partial.write_text("".join(line + "\n" for line in lines))
    os.replace(partial, run_dir / "rounds.jsonl")  # whoever reads the log never sees half of it


class RoundProgress:
    """One console line per completed round, read from rounds.jsonl while `flwr run` works in other
    processes: which round of how many, what became of the merchants' updates, the time so far and
    about how much is left. Rounds are told by their number, so a log rewritten on resumption repeats
    nothing; the pace is the first round's time (start-up included) until later rounds give their own."""

    def __init__(self, run_dir: Path, total: int, echo: Callable[[str], None], *, resumed: bool) -> None:
        self.log, self.total, self.echo = run_dir / "rounds.jsonl", total, echo
        rounds = completed_rounds(run_dir) if resumed else []
        self.reported = rounds[-1] if rounds else 0  # what a resumed run had done before is not news
        self.started = time.monotonic()
        self.first_reported: float | None = None
        self.new = 0

    def __call__(self) -> None:
        for record in self._records():
            if record["round"] <= self.reported:
                continue
            self.reported, self.new, now = record["round"], self.new + 1, time.monotonic()
            if self.first_reported is None:
                self.first_reported, pace = now, now - self.started
            else:
                pace = (now - self.first_reported) / (self.new - 1)
            failures = record.get("failed", []) + record.get("backbone_failed", [])
            reasons = sorted({str(failure.get("reason")) for failure in failures})
            self.echo(
                f"round {record['round']} of {self.total}: {len(record.get('accepted', []))} updates "
                f"accepted, {len(record.get('rejected', []))} rejected, {len(failures)} "
                f"merchant{'s' * (len(failures) != 1)} failed"
                + (f" ({', '.join(reasons)})" if reasons else "")
                + f"; {_duration(now - self.started)} so far"
                + (
                    f", about {_duration(pace * (self.total - self.reported))} left"
                    if self.reported < self.total
                    else ""
                )
            )

    def _records(self) -> list[dict[str, Any]]:
        """The log's whole lines that read as round records (a line still being written has no newline)."""
        text = self.log.read_text() if self.log.exists() else ""
        records = []
        for line in text.split("\n")[:-1]:
            try:
                record = json.loads(line)
                record["round"] = int(record["round"])
            except (ValueError, KeyError, TypeError):
                continue  # the console's progress is no reason to stop a run
            records.append(record)
        return records


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
