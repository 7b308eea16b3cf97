"""`fedanom privacy report RUN_DIR`: each merchant's ε over a federation's rounds, as a table and a chart.

Read from the run's `rounds.jsonl`, where the server logs every accepted merchant's accountant summary
(`common.policy`) each round, the merchants it refused with their fixed reasons, and the policy in force.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from fedanom.common.errors import FedanomError

REFUSED = "refused"


def epsilon_by_round(run_dir: Path) -> tuple[list[int], dict[str, dict[int, float | str]], dict[str, Any]]:
    """(rounds, {merchant: {round: ε spent after it, or why it was left out}}, the policy in force)."""
    log = run_dir / "rounds.jsonl"
    if not log.is_file():
        raise FedanomError(f"{run_dir} holds no rounds.jsonl: not a federation's run directory")
    rounds: list[int] = []
    table: dict[str, dict[int, float | str]] = {}
    policy: dict[str, Any] = {}
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            this_round = int(record["round"])
            clients = record.get("clients", {})
            left_out = [*record.get("failed", []), *record.get("rejected", [])]
        except (ValueError, KeyError, TypeError):
            raise FedanomError(f"{log}, line {number}: not a round fedanom logged") from None
        rounds.append(this_round)
        policy = record.get("policy", policy)
        for node, metrics in clients.items():
            table.setdefault(str(node), {})[this_round] = float(metrics["epsilon"])
        for entry in left_out:
            table.setdefault(str(entry["node"]), {}).setdefault(this_round, f"{REFUSED}: {entry['reason']}")
    return rounds, table, policy


def table(rounds: list[int], spent: dict[str, dict[int, float | str]], policy: dict[str, Any]) -> Table:
    """Merchants by rounds: ε spent after each, or why the merchant was left out."""
    terms = ["DP required"] if policy else ["no privacy policy"]
    terms += [
        f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
        for k, v in policy.items()
        if v and k != "require_dp"
    ]
    out = Table(title=f"ε spent per merchant ({', '.join(terms)})")
    out.add_column("merchant")
    for r in rounds:
        out.add_column(f"round {r}", justify="right")
    for node, by_round in sorted(spent.items()):
        cells = [by_round.get(r, "") for r in rounds]
        out.add_row(node, *(f"{c:.3f}" if isinstance(c, float) else c for c in cells))
    return out


def chart(
    rounds: list[int], table: dict[str, dict[int, float | str]], policy: dict[str, Any], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for node, spent in sorted(table.items()):
        points = [(r, v) for r, v in sorted(spent.items()) if isinstance(v, float)]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=f"merchant {node[-6:]}")
    if policy.get("max_epsilon"):
        axes.axhline(policy["max_epsilon"], linestyle="--", color="grey", label="policy's maximum ε")
    axes.set_xlabel("round")
    axes.set_ylabel("ε spent so far")
    axes.set_xticks(rounds)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
