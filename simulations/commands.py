"""`fedanom simulate`: virtual merchants on Flower's Simulation Engine, every method compared, one report.

With no `--data` it needs no files: synthetic merchants of falling size with their own catalogues. With
`--data FILE:PRESET` (repeatable) each real export is one merchant; a single file with `--partition`
is split among `--merchants`. The backbone is pretrained on a separate synthetic "public" shop (the
operator's public data) unless `--base` names one. The model stack and Flower are imported once the
options are checked, so a mistake is answered in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedanom.common.errors import FedanomError
from fedanom.common.settings import EPSILON, BackboneConfig, RunSettings, TrainSettings
from fedanom.options import PrivacyUnitOption, VerboseOption, err, file_and_preset
from fedanom.simulations.scenario import (
    TEST_SHARE,
    shop_sizes,
)

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
    privacy_unit: PrivacyUnitOption = TrainSettings.privacy_unit,
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    verbose: VerboseOption = False,
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
    TrainSettings(privacy_unit=privacy_unit)  # a unit that is not one, said before anything runs
    from fedanom.simulations.study import (  # the model stack and Flower, once options are good
        Study,
        run_study,
    )

    study = Study(
        shop_events=shop_events,
        sources=sources,
        merchants=merchants,
        partition=partition_spec,
        rounds=rounds,
        epsilon=epsilon,
        seed=seed,
        test_share=test_share,
        unlabelled=unlabelled,
        head=head,
        privacy_unit=privacy_unit,
        backbone=BackboneConfig(d_model=d_model, n_layers=layers),
        base=base,
        verbose=verbose,
    )
    results = run_study(study, out, err)
    if json_out:
        typer.echo(json.dumps(results, indent=2))
    best = max(results["methods"], key=lambda m: results["methods"][m]["mean"]["auprc"])
    err.print(
        f"simulation done in {results['scenario']['seconds']:.0f} s: {out / 'report.md'}; mean AUPRC "
        + ", ".join(f"{m} {v['mean']['auprc']:.3f}" for m, v in results["methods"].items())
        + f" (best: {best}); Flower's logs: {out / 'work'}/federated*/flower.log"
    )


def _parse_sizes(spec: str) -> list[int]:
    try:
        sizes = [int(part) for part in spec.split(",")]
    except ValueError:
        raise FedanomError(f"--sizes {spec}: write whole numbers of events, e.g. 24000,12000,1000") from None
    if any(size < 200 for size in sizes):
        raise FedanomError(f"--sizes {spec}: a merchant needs at least 200 events")
    return sizes
