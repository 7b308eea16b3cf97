"""The detector's score, piece by piece, on real exports with injected bots: what each kind of evidence adds.

    python benchmarks/score_parts.py [--shops rees46,diginetica,yoochoose] [--seed 0] [--out DIR]

Each export is one merchant that knows no attacks: bots of every type injected as `fedanom simulate`
injects them, the latest 20% of events its test set, a DP fit (ε = 8, 3 epochs) on a backbone
pretrained on the synthetic public shop. On the same test sessions: PyOD's IsolationForest and ECOD, the
mean event surprise alone, the sequence score (context + events), the feature reference alone, and the
detector's score (both, each scaled by its normal validation sessions' median-to-99th-percentile
distance). Prints test AUROC and AUPRC per shop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyod.models.ecod import ECOD
from pyod.models.iforest import IForest
from sklearn.metrics import average_precision_score, roc_auc_score

from fedanom.client.detector import BehaviourDetector
from fedanom.common.privacy import PrivacyLedger
from fedanom.common.scoring import aggregate
from fedanom.common.settings import BackboneConfig, LoraSettings, TrainSettings
from fedanom.common.windows import Windows
from fedanom.simulations.commands import _pretrain
from fedanom.simulations.compare import load_sessions
from fedanom.simulations.scenario import prepare, real_shops

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SHOPS = {
    "rees46": ("rees46-multicategory/2019-Oct_sample_ibrhmspl.csv.gz", "rees46"),
    "diginetica": ("diginetica-sample/sample_train-item-views.csv.gz", "diginetica"),
    "yoochoose": ("yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.tsv.gz", "yoochoose"),
    "taobao": ("taobao-userbehavior/UserBehavior_2017-11-26_window.csv.gz", "taobao"),
}


def parts(shop: str, seed: int, work: Path) -> None:
    path, preset = SHOPS[shop]
    (merchant,) = prepare(real_shops([(DATA / path, preset)]), work / "merchants", seed, unlabelled=1)
    s = load_sessions(merchant, work)
    base = _pretrain(work, BackboneConfig(), seed)
    detector = BehaviourDetector.from_backbone(base, s.popularity, lora=LoraSettings(seed=seed))
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / s.train.n_windows)
    detector.fit(Windows.concat([s.train, s.validation]), None, train=TrainSettings(seed=seed), ledger=ledger)
    surprise = detector.surprise(s.test)
    assert detector.reference is not None
    sequence = aggregate(surprise, s.test, "mean")
    events = sequence - surprise.context.sum(1)
    scores = {
        "isolation-forest": IForest(random_state=seed)
        .fit(s.train.features)
        .decision_function(s.test.features),
        "ecod": ECOD().fit(s.train.features).decision_function(s.test.features),
        "mean event surprise": events,
        "sequence (context + events)": sequence,
        "feature reference": detector.reference.surprise(s.test.features),
        "detector score": detector.combine(surprise, s.test),
    }
    labels = s.labels(s.test)
    print(
        f"| {shop} | {labels.sum()} bots / {len(labels)} | "
        + " | ".join(
            f"{roc_auc_score(labels, v):.3f} / {average_precision_score(labels, v):.3f}"
            for v in scores.values()
        )
        + " |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shops", default="rees46,diginetica,yoochoose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/score-parts"))
    args = parser.parse_args()
    print(
        "| shop | test | IsolationForest | ECOD | mean event surprise | sequence (context + events) | "
        "feature reference | detector score |"
    )
    print("|---|---|" + "---:|" * 6)
    for shop in args.shops.split(","):
        parts(shop, args.seed, args.out / shop)


if __name__ == "__main__":
    main()
