"""Where centralized's lead over federated + DP comes from, for the data-starved merchant.

    python benchmarks/starved_parts.py --run bench-out/real-traffic/starved [--seeds 0-2]

Reads the `starved` scenario's runs that `benchmarks/real_traffic.py` left under --run (each seed's
backbone and every merchant's final federated + DP detector), rebuilds the same merchants and fits the
centralized detector again (it is not kept). For the merchant that knows no attacks it prints the test
AUROC / AUPRC of each kind of evidence alone (each standardised on its normal validation sessions, as
the detector does) from the federated + DP detector and from the centralized one, each with its own
feature reference and with one fitted on every merchant's normal training sessions pooled. It also
prints what the federation would give that merchant if the labelled merchants' validation AUPRC
(weighted as the server weighs metrics) chose the kinds its score sums.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from real_traffic import DATA, YOOCHOOSE_LONG  # the starved scenario's export
from sklearn.metrics import average_precision_score, roc_auc_score

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.evidence import scales, standardised
from fedanom.common.detector.reference import FeatureReference
from fedanom.common.detector.scoring import Surprise
from fedanom.common.settings import LoraSettings
from fedanom.common.windows import Windows
from fedanom.server.aggregation import capped_weights
from fedanom.simulations.compare import Sessions, _settings, load_sessions
from fedanom.simulations.scenario import partition, prepare, real_shops

STARVED = (DATA / YOOCHOOSE_LONG, "yoochoose")


def standardised_parts(
    detector: BehaviourDetector, s: Sessions, part: Windows, surprise: tuple[Surprise, Surprise]
) -> dict[str, np.ndarray]:
    """Each kind of evidence about `part`, scaled on the normal validation sessions; `surprise` is the
    model's on (validation, part), which no feature reference changes."""
    validation = detector.evidence(surprise[0], s.validation)
    return standardised(detector.evidence(surprise[1], part), scales(validation, ~s.known(s.validation)))


def seed_parts(run: Path, seed: int) -> None:
    ((name, frame),) = real_shops([STARVED])
    shops = [(f"{name}#{k + 1}", p) for k, p in enumerate(partition(frame, 4, "quantity:1.0", seed))]
    merchants = prepare(shops, run / f"seed-{seed}" / "parts", seed, unlabelled=1)
    sessions = [load_sessions(m, run / f"seed-{seed}" / "parts") for m in merchants]
    starved = next(i for i, m in enumerate(merchants) if not m.labelled)
    s, y = sessions[starved], sessions[starved].labels(sessions[starved].test)
    state = run / f"seed-{seed}" / "work" / "federated-dp" / "state"
    federated = [BehaviourDetector.load(state / f"merchant-{i}" / "detector") for i in range(len(merchants))]

    # the kinds the labelled merchants' validation would choose, weighted as the server weighs metrics
    votes, sizes = [], []
    for i, x in enumerate(sessions):
        if merchants[i].labelled:
            surprise = federated[i].surprise(x.validation)
            parts = standardised_parts(federated[i], x, x.validation, (surprise, surprise))
            known = x.known(x.validation)
            kinds = [c for r in range(len(parts), 0, -1) for c in itertools.combinations(parts, r)]
            votes.append({c: average_precision_score(known, sum(parts[k] for k in c)) for c in kinds})
            sizes.append(x.validation.n_windows)
    weights = capped_weights(sizes)
    mean = {c: float(np.dot([v[c] for v in votes], weights) / weights.sum()) for c in votes[0]}
    chosen = max(mean, key=lambda c: mean[c])  # ties: the first, the one with more kinds
    read = {"federated-dp": (federated[starved].surprise(s.validation), federated[starved].surprise(s.test))}
    parts = standardised_parts(federated[starved], s, s.test, read["federated-dp"])
    every = average_precision_score(y, sum(parts.values()))
    picked = average_precision_score(y, sum(parts[k] for k in chosen))
    print(f"seed {seed}: the federation's choice {'+'.join(chosen)}: AUPRC {picked:.3f} (all: {every:.3f})")

    pooled = Windows.concat(
        [x.train.keyed(f"merchant-{i}") for i, x in enumerate(sessions)]
        + [x.validation.keyed(f"merchant-{i}") for i, x in enumerate(sessions)]
    )
    labels = np.concatenate([x.known(x.train) for x in sessions] + [x.known(x.validation) for x in sessions])
    lora = LoraSettings(seed=seed, supervised_head=True)
    centralized = BehaviourDetector.from_backbone(
        run / f"seed-{seed}" / "work" / "base", s.popularity, lora=lora
    )
    centralized.fit(pooled, labels, train=_settings(3, False, seed))
    normal_training = Windows.concat([x.train.select(~x.known(x.train)) for x in sessions])
    references = {
        "own reference": FeatureReference.fit(s.train.features, seed=seed),
        "pooled reference": FeatureReference.fit(normal_training.features, seed=seed),
    }
    read["centralized"] = (centralized.surprise(s.validation), centralized.surprise(s.test))
    for method, detector in (("federated-dp", federated[starved]), ("centralized", centralized)):
        for reference_name, reference in references.items():
            detector.reference = reference
            parts = standardised_parts(detector, s, s.test, read[method])
            cells = [
                f"{k} {roc_auc_score(y, v):.3f} / {average_precision_score(y, v):.3f}"
                for k, v in parts.items()
            ]
            print(f"seed {seed} {method}, {reference_name}: " + "; ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="real_traffic.py's starved directory")
    parser.add_argument("--seeds", default="0-2", help="first-last, e.g. 0-2")
    args = parser.parse_args()
    first, _, last = args.seeds.partition("-")
    for seed in range(int(first), int(last or first) + 1):
        seed_parts(args.run, seed)


if __name__ == "__main__":
    main()
