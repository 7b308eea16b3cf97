"""`fedanom simulate`: virtual merchants on Flower's Simulation Engine, every method compared, one report.

With no `--data` it needs no files: synthetic merchants of falling size with their own catalogues. With
`--data FILE:PRESET` (repeatable) each real export is one merchant; a single file with `--partition`
is split among `--merchants`. The backbone is pretrained on a separate synthetic "public" shop (the
operator's public data) unless `--base` names one. The model stack and Flower are imported once the
options are checked, so a mistake is answered in about a second.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedanom.common.errors import FedanomError
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import EPSILON, PRETRAIN, BackboneConfig, RunSettings
from fedanom.common.windows import Windows
from fedanom.options import err, file_and_preset
from fedanom.simulations.calibration import behaviour_stats
from fedanom.simulations.scenario import (
    TEST_SHARE,
    partition,
    prepare,
    real_shops,
    shop_sizes,
    synthetic_shops,
)
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv

DEFAULT = BackboneConfig()


def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory.")] = Path("simulation-out"),
    merchants: Annotated[int, typer.Option("--merchants", help="Synthetic or partitioned merchants.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds")] = RunSettings.num_server_rounds,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Each merchant's privacy budget.")] = EPSILON,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    scale: Annotated[
        float, typer.Option("--scale", help="Synthetic merchants' size (1: 24k events at most).")
    ] = 1.0,
    sizes: Annotated[
        str | None,
        typer.Option("--sizes", help="Synthetic merchants' events, comma-separated (sets --merchants)."),
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="FILE:PRESET, one merchant each (repeat).")
    ] = None,
    partition_spec: Annotated[
        str | None,
        typer.Option("--partition", help="Split one --data file: natural:COLUMN, dirichlet:A, quantity:A."),
    ] = None,
    test_share: Annotated[
        float,
        typer.Option(
            "--test-share", help="Each merchant's latest share of events kept for testing (short history)."
        ),
    ] = TEST_SHARE,
    base: Annotated[
        Path | None, typer.Option("--base", help="Use this backbone instead of pretraining.")
    ] = None,
    d_model: Annotated[int, typer.Option("--d-model")] = DEFAULT.d_model,
    layers: Annotated[int, typer.Option("--layers")] = DEFAULT.n_layers,
    head: Annotated[
        bool,
        typer.Option(
            "--head/--no-head",
            help="Merchants' known attacks train an anomaly head (federated, local and centralized alike).",
        ),
    ] = True,
    unlabelled: Annotated[
        int,
        typer.Option(
            "--unlabelled",
            help="This many of the smallest merchants know none of their past attacks (no fraud team).",
        ),
    ] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Flower's and Ray's logs on the console, not in flower.log.")
    ] = False,
) -> None:
    """Simulate a federation and compare it with local, centralized and feature baselines."""
    if not 0.05 <= test_share <= 0.95:
        raise FedanomError(f"--test-share {test_share:g}: keep between 0.05 and 0.95 of events for testing")
    shop_events = _parse_sizes(sizes) if sizes else shop_sizes(merchants, scale)
    if len(shop_events) < 2:
        raise FedanomError("--merchants must be at least 2 (a federation of one is local training)")
    sources = [file_and_preset(spec, "--data") for spec in data or []]
    if partition_spec and len(sources) != 1:
        raise FedanomError("--partition splits exactly one --data file")
    count = len(shop_events) if not sources else merchants if partition_spec else len(sources)
    if not 0 <= unlabelled <= count:
        raise FedanomError(f"--unlabelled {unlabelled}: choose between 0 and the {count} merchants")
    from fedanom.simulations.compare import load_sessions, metrics, run_all
    from fedanom.simulations.report import write_report

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("preparing merchants", total=None)
        if not sources:
            shops = synthetic_shops(shop_events, seed)
        elif partition_spec:
            ((name, frame),) = real_shops(sources)
            shops = [
                (f"{name}#{k + 1}", part)
                for k, part in enumerate(partition(frame, merchants, partition_spec, seed))
            ]
        else:
            shops = real_shops(sources)
        calibration = {name: behaviour_stats(frame) for name, frame in shops}
        prepared = prepare(shops, work / "merchants", seed, test_share, unlabelled)
        head = head and any(m.labelled for m in prepared)  # nobody's labels: a head would learn nothing
        bar.update(task, description="pretraining the backbone")
        base = base or _pretrain(work, BackboneConfig(d_model=d_model, n_layers=layers), seed)
        bar.update(task, description="reading sessions")
        sessions = [load_sessions(m, work) for m in prepared]
        comparison = run_all(
            prepared,
            sessions,
            base,
            work,
            rounds=rounds,
            epsilon=epsilon,
            seed=seed,
            head=head,
            on_method=lambda method: bar.update(task, description=f"method: {method}"),
            verbose=verbose,
        )
    scenario = {
        "rounds": rounds,
        "test_share": test_share,
        "supervised_head": head,
        "epsilon": epsilon,
        "seed": seed,
        "backbone": str(base),
        "merchants": [
            {"name": m.name, "events": m.events, "bots": len(m.bots), "labelled": m.labelled}
            for m in prepared
        ],
        "calibration": calibration,
        "seconds": time.perf_counter() - started,
    }
    results = write_report(
        out, scenario, [m.name for m in prepared], sessions, comparison, metrics(sessions, comparison)
    )
    if json_out:
        typer.echo(json.dumps(results, indent=2))
    best = max(results["methods"], key=lambda m: results["methods"][m]["mean"]["auprc"])
    err.print(
        f"simulation done in {scenario['seconds']:.0f} s: {out / 'report.md'}; mean AUPRC "
        + ", ".join(f"{m} {v['mean']['auprc']:.3f}" for m, v in results["methods"].items())
        + f" (best: {best}); Flower's logs: {work}/federated*/flower.log"
    )


def _parse_sizes(spec: str) -> list[int]:
    try:
        sizes = [int(part) for part in spec.split(",")]
    except ValueError:
        raise FedanomError(f"--sizes {spec}: write whole numbers of events, e.g. 24000,12000,1000") from None
    if any(size < 200 for size in sizes):
        raise FedanomError(f"--sizes {spec}: a merchant needs at least 200 events")
    return sizes


# The operator's public data is not the merchants' traffic: another shop, with shorter, slower sessions
# and a thinner funnel. What the merchants' adapters must learn is that difference (with the same
# generator settings for both, the backbone already knows everything and no method can add anything).
PUBLIC_SHOP = ShopConfig(
    n_events=30_000,
    n_users=3_000,
    n_items=8_000,
    mean_session_events=2.5,
    median_gap_s=90.0,
    p_fav=0.01,
    p_cart=0.03,
    zipf_a=1.3,
    p_login=0.05,
)


def _pretrain(work: Path, config: BackboneConfig, seed: int) -> Path:
    from fedanom.common.detector.artifact import save_backbone
    from fedanom.server.pretrain import pretrain_backbone

    public = generate_shop(PUBLIC_SHOP, seed=seed + 10_000)
    ingested = ingest(write_taobao_csv(public, work / "public.csv"), resolve_preset("taobao"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    model, _ = pretrain_backbone(windows, config, replace(PRETRAIN, seed=seed))
    save_backbone(model, work / "base", {"simulation": "synthetic public shop", "seed": seed})
    return work / "base"
