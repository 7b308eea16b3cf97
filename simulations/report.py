"""A simulation's output: `results.json` (everything measured), `report.md` (tables) and PNG plots.

Plots: precision-recall curves per method (one panel per merchant), the federated runs' validation
AUPRC per round, ε spent per round per merchant, and recall per attack type per method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve

from fedanom.simulations.calibration import calibration_table
from fedanom.simulations.compare import METHODS, Comparison, Sessions

HEADLINE = ("auprc", "auroc", "recall_at_1pct_fpr", "f1", "false_alert_rate")
UNIT_WORDS = {"user": "shopper, all their sessions", "session": "session"}  # what ε protected as one


def averaged(per_merchant: list[dict[str, Any]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_merchant])) for key in HEADLINE}


def write_report(
    out: Path,
    scenario: dict[str, Any],
    names: list[str],
    sessions: list[Sessions],
    comparison: Comparison,
    metrics: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "scenario": scenario,
        "merchants": names,
        "methods": {
            method: {"per_merchant": metrics[method], "mean": averaged(metrics[method])} for method in metrics
        },
        "rounds": {method: [_round_summary(r) for r in log] for method, log in comparison.rounds.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plots = [
        _pr_curves(out, names, sessions, comparison),
        _per_round(
            out, comparison, "val-auprc", "validation AUPRC (example-weighted)", "auprc_per_round.png"
        ),
        _epsilon(out, names, comparison),
        _attack_recall(out, metrics),
    ]
    (out / "report.md").write_text(_markdown(results, names, sessions, plots))
    return results


def _round_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": record["round"],
        "train": record.get("train", {}),
        "evaluate": record.get("evaluate", {}).get("combined", {}),
        "epsilon": {node: c["epsilon"] for node, c in record["clients"].items()},
        "seconds": record.get("seconds", {}),
    }


def _markdown(results: dict[str, Any], names: list[str], sessions: list[Sessions], plots: list[str]) -> str:
    scenario = results["scenario"]
    lines = [
        "# fedanom simulation report",
        "",
        f"{len(names)} merchants, {scenario['rounds']} federated rounds, ε = {scenario['epsilon']:g} per "
        f"merchant (its unit: one {UNIT_WORDS[scenario.get('privacy_unit', 'session')]}), seed "
        f"{scenario['seed']}; each merchant's latest {scenario['test_share']:.0%} of events "
        "are its test set. Thresholds are chosen on each merchant's validation sessions "
        "(best F1); every test session counts once (no point adjustment).",
        "",
        "## Merchants",
        "",
        "| merchant | events | train / validation / test sessions | bots in test | knows its attacks |",
        "|---|---:|---:|---:|---|",
    ]
    for name, s, info in zip(names, sessions, scenario["merchants"], strict=True):
        lines.append(
            f"| {name} | {info['events']:,} | {s.train.n_windows:,} / "
            f"{s.validation.n_windows:,} / {s.test.n_windows:,} | {int(s.labels(s.test).sum())} | "
            f"{'yes' if s.labelled else 'no'} |"
        )
    lines += [
        "",
        "## Normal traffic against the real samples",
        "",
        "Each merchant's traffic before bots are added, next to the targets measured on the real samples "
        "(simulations/calibration.py says which sample informs which target).",
        "",
        *calibration_table(scenario["calibration"]),
        "",
        "## Methods, averaged over merchants",
        "",
        "| method | AUPRC | AUROC | recall @1% FPR | F1 | false alerts at the 1% level |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for method, values in results["methods"].items():
        mean = values["mean"]
        lines.append(f"| {method} | " + " | ".join(f"{mean[k]:.3f}" for k in HEADLINE) + " |")
    lines += ["", "## AUPRC per merchant", "", "| method | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
    for method, values in results["methods"].items():
        lines.append(
            f"| {method} | " + " | ".join(f"{m['auprc']:.3f}" for m in values["per_merchant"]) + " |"
        )
    kinds = sorted(
        {k for v in results["methods"].values() for m in v["per_merchant"] for k in m["per_attack_recall"]}
    )
    lines += ["", "## Recall per attack type (mean over merchants, at the validation threshold)", ""]
    lines += ["| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for method, values in results["methods"].items():
        cells = ["-" if np.isnan(v) else f"{v:.2f}" for v in _recall_by_attack(values["per_merchant"], kinds)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Federated rounds",
        "",
        "| run | round | train loss | max ε | validation AUPRC | seconds |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for method, rounds in results["rounds"].items():
        for r in rounds:
            auprc = r["evaluate"].get("val-auprc")
            lines.append(
                f"| {method} | {r['round']} | {r['train'].get('train-loss', float('nan')):.3f} | "
                f"{r['train'].get('max-epsilon', 0.0):.2f} | {'-' if auprc is None else f'{auprc:.3f}'} | "
                f"{r['seconds'].get('train_round_trip', float('nan')):.1f} |"
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _pr_curves(out: Path, names: list[str], sessions: list[Sessions], comparison: Comparison) -> str:
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for j, (name, s) in enumerate(zip(names, sessions, strict=True)):
        labels = s.labels(s.test)
        for method in METHODS:
            if method in comparison.scores:
                precision, recall, _ = precision_recall_curve(labels, comparison.scores[method][j][1])
                axes[0, j].plot(recall, precision, label=method)
        axes[0, j].set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes[0, 0].legend(fontsize=8)
    return _save(fig, out, "pr_curves.png")


def _per_round(out: Path, comparison: Comparison, key: str, label: str, name: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, log in comparison.rounds.items():
        points = [
            (r["round"], r["evaluate"]["combined"][key]) for r in log if key in r["evaluate"]["combined"]
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set(xlabel="round", ylabel=label)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def _epsilon(out: Path, names: list[str], comparison: Comparison) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    log = comparison.rounds.get("federated-dp", [])
    nodes = sorted({node for r in log for node in r["clients"]})
    for k, node in enumerate(nodes):
        points = [(r["round"], r["clients"][node]["epsilon"]) for r in log if node in r["clients"]]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"node {k + 1}")
    ax.set(xlabel="round", ylabel="ε spent (cumulative)")
    ax.legend(fontsize=8)
    return _save(fig, out, "epsilon_per_round.png")


def _recall_by_attack(per_merchant: list[dict[str, Any]], kinds: list[str]) -> list[float]:
    """Mean recall over the merchants whose test set holds the attack (nan where none does)."""
    out = []
    for kind in kinds:
        seen = [m["per_attack_recall"][kind] for m in per_merchant if kind in m["per_attack_recall"]]
        out.append(float(np.mean(seen)) if seen else float("nan"))
    return out


def _attack_recall(out: Path, metrics: dict[str, list[dict[str, Any]]]) -> str:
    """A methods x attacks grid of recall at the validation threshold (blank: no such bot in test)."""
    kinds = sorted({k for per in metrics.values() for m in per for k in m["per_attack_recall"]})
    grid = np.array([_recall_by_attack(per, kinds) for per in metrics.values()])
    fig, ax = plt.subplots(figsize=(2.5 + 0.75 * len(kinds), 1.5 + 0.45 * len(metrics)))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
            )
    ax.set_xticks(np.arange(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(metrics)), list(metrics), fontsize=8)
    fig.colorbar(image, ax=ax, label="recall at the validation threshold")
    return _save(fig, out, "attack_recall.png")


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
