"""The detector's score, piece by piece, on real exports with injected bots: what each kind of evidence adds.

    python benchmarks/score_parts.py [--shops rees46,diginetica,yoochoose] [--seeds 0-2] [--out DIR]
                                     [--labelled] [--learning-rate LR] [--untrained]

Each export is one merchant: bots of every type injected as `fedanom simulate` injects them, the latest
20% of events its test set, a DP fit (ε = 8, 3 epochs, at the default learning rate or LR) on a backbone
pretrained on the synthetic public shop; `--untrained` calibrates the untrained adapter instead of
fitting. By default the merchant knows no attacks; with `--labelled` it knows those of its earlier
period, trains the anomaly head on them and lets them choose the kinds of evidence its score sums. On
the same test sessions: PyOD's IsolationForest and ECOD, the mean event surprise alone, the sequence
score (context + events), the feature reference alone, the head alone (labelled), every kind summed
(each scaled by its normal validation sessions' median-to-99th-percentile distance), and the detector's
score. Prints test AUROC / AUPRC per shop and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.scoring import aggregate
from fedanom.common.detector.training import privacy_units
from fedanom.common.settings import BackboneConfig, LoraSettings, TrainSettings
from fedanom.common.windows import Windows
from fedanom.simulations.baselines import BASELINES
from fedanom.simulations.compare import load_sessions
from fedanom.simulations.scenario import prepare, real_shops
from fedanom.simulations.study import pretrain_public_backbone

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SHOPS = {
    "rees46": ("rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz", "rees46"),
    "diginetica": ("diginetica-sample/sample_train-item-views.csv.gz", "diginetica"),
    "yoochoose": ("yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.tsv.gz", "yoochoose"),
    "taobao": ("taobao-userbehavior/UserBehavior_2017-11-26_window.csv.gz", "taobao"),
    "yoochoose-test": ("yoochoose-rsc15-100k/yoochoose-clicks-100k_test.tsv.gz", "yoochoose"),
    "talkingdata": ("talkingdata-adtracking-sample/train_sample.csv.gz", "talkingdata"),
}


def parts(shop: str, seed: int, work: Path, args: argparse.Namespace) -> None:
    path, preset = SHOPS[shop]
    unlabelled = 0 if args.labelled else 1
    (merchant,) = prepare(
        real_shops([(DATA / path, preset)]), work / "merchants", seed, unlabelled=unlabelled
    )
    s = load_sessions(merchant, work)
    base = pretrain_public_backbone(work, BackboneConfig(), seed)
    lora = LoraSettings(seed=seed, supervised_head=args.labelled and not args.untrained)
    detector = BehaviourDetector.from_backbone(base, s.popularity, lora=lora)
    if args.untrained:
        detector.calibrate(s.validation, s.known(s.validation), training=s.train.select(~s.known(s.train)))
    else:
        fit = Windows.concat([s.train, s.validation])
        settings = TrainSettings(seed=seed, learning_rate=args.learning_rate or TrainSettings.learning_rate)
        ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / privacy_units(s.train, settings))
        detector.fit(fit, s.known(fit), train=settings, ledger=ledger)
    surprise = detector.surprise(s.test)
    assert detector.reference is not None
    sequence = aggregate(surprise, s.test, detector.aggregation)
    events = sequence - surprise.context.sum(1)
    kinds = detector.evidence(surprise, s.test)
    validation = detector.evidence(detector.surprise(s.validation), s.validation)
    normal = ~s.known(s.validation)
    summed = sum(
        (kinds[k] - np.median(v[normal])) / (np.quantile(v[normal], 0.99) - np.median(v[normal]) or 1.0)
        for k, v in validation.items()
    )
    scores = {
        **{name: make(seed).fit(s.train).decision_function(s.test) for name, make in BASELINES.items()},
        "mean event surprise": events,
        "sequence (context + events)": sequence,
        "feature reference": kinds["features"],
        "head": kinds.get("head"),
        "every kind summed": summed,
        "detector score": detector.combine(surprise, s.test),
    }
    labels = s.labels(s.test)
    print(
        f"| {shop} | {seed} | {labels.sum()} bots / {len(labels)} | "
        + " | ".join(
            f"{roc_auc_score(labels, v):.3f} / {average_precision_score(labels, v):.3f}"
            if v is not None
            else "-"
            for v in scores.values()
        )
        + f" | {'+'.join(detector.kinds())} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shops", default="rees46,diginetica,yoochoose")
    parser.add_argument("--seeds", default="0", help="first-last, e.g. 0-2")
    parser.add_argument("--out", type=Path, default=Path("bench-out/score-parts"))
    parser.add_argument("--labelled", action="store_true", help="the merchant knows its earlier attacks")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--untrained", action="store_true", help="calibrate the untrained adapter only")
    args = parser.parse_args()
    print(
        "| shop | seed | test | IsolationForest | ECOD | mean event surprise | sequence (context + events) | "
        "feature reference | head | every kind summed | detector score | kinds it sums |"
    )
    print("|---|---|---|" + "---:|" * 8 + "---|")
    first, _, last = args.seeds.partition("-")
    for shop in args.shops.split(","):
        for seed in range(int(first), int(last or first) + 1):
            parts(shop, seed, args.out / shop / f"seed-{seed}", args)


if __name__ == "__main__":
    main()
