"""The detector: quality floor on a seeded shop with bots, the artifact on disk, plain-peft loading."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io
import torch
from peft import PeftModel
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM

from fedanom.common.detector.artifact import save_backbone
from fedanom.common.detector.detector import BehaviourDetector
from fedanom.common.detector.evidence import MIN_KNOWN_TO_CHOOSE, choose_kinds
from fedanom.common.detector.model import build_backbone, next_token_nll, pad_batch
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.detector.reference import FeatureReference
from fedanom.common.errors import FedanomError
from fedanom.common.features import FEATURE_NAMES
from fedanom.common.ingest import ingest
from fedanom.common.presets import resolve_preset
from fedanom.common.settings import BackboneConfig, LoraSettings, TrainSettings
from fedanom.common.tokens import CONTEXT, CONTEXT_OFFSETS, CONTEXT_WIDTHS, Popularity
from fedanom.common.windows import Windows
from fedanom.server.pretrain import pretrain_backbone
from fedanom.simulations.attacks import ATTACKS, inject
from fedanom.simulations.shop import ShopConfig, generate_shop, write_taobao_csv


def windows_of(frame: pd.DataFrame, path: Path) -> Windows:
    write_taobao_csv(frame, path)
    ingested = ingest(path, resolve_preset("taobao"))
    return Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)


@dataclass
class Fitted:
    detector: BehaviourDetector
    base: Path
    dev: Windows
    dev_labels: np.ndarray
    popularity: Popularity
    test: Windows
    test_labels: np.ndarray
    test_kinds: np.ndarray


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """A backbone pretrained on one synthetic shop; a DP detector (ε = 8) fitted on another with bots."""
    root = tmp_path_factory.mktemp("detector")
    public = windows_of(
        generate_shop(ShopConfig(n_events=40_000, n_users=4_000, n_items=12_000), seed=100), root / "p.csv"
    )
    model, _ = pretrain_backbone(
        public, BackboneConfig(), TrainSettings(dp=False, epochs=2, learning_rate=3e-3)
    )
    base = root / "base"
    save_backbone(model, base, {"test": True})

    shop = generate_shop(ShopConfig(n_events=30_000, n_users=3_000, n_items=8_000), seed=1)
    frame = inject(shop, {name: 15 for name in ATTACKS}, seed=2)
    windows = windows_of(frame, root / "merchant.csv")
    kind_of = dict(zip(frame.user_id.astype(str), frame.attack, strict=False))
    dev, test = windows.chronological_split(0.75, 0.25)
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / dev.n_windows)
    popularity = ingest(root / "merchant.csv", resolve_preset("taobao")).popularity
    # the merchant knows its past attacks: bots are 3% of sessions, more than the 1% alert rate, so an
    # unlabelled threshold would sit among the bots and flag no normal session at all
    dev_labels = np.array([kind_of[u] != "" for u in dev.user], dtype=np.int8)
    detector = BehaviourDetector.from_backbone(base, popularity)
    detector.fit(dev, dev_labels, train=TrainSettings(epochs=3, seed=0), ledger=ledger)
    kinds = np.array([kind_of[u] for u in test.user])
    return Fitted(detector, base, dev, dev_labels, popularity, test, kinds != "", kinds)


def test_dp_detector_reaches_the_quality_floor_and_beats_isolation_forest(fitted: Fitted) -> None:
    scores = fitted.detector.decision_function(fitted.test)
    assert fitted.test_labels.sum() >= 10
    auroc = roc_auc_score(fitted.test_labels, scores)
    forest = IsolationForest(random_state=0).fit(fitted.dev.features)
    forest_auroc = roc_auc_score(fitted.test_labels, -forest.score_samples(fitted.test.features))
    assert fitted.detector.provenance["epsilon"] <= 8.0
    assert auroc >= 0.9, f"AUROC {auroc:.3f}"
    assert auroc > forest_auroc, f"detector {auroc:.3f} vs IsolationForest {forest_auroc:.3f}"
    # each crude attack (script speed) is caught nearly perfectly
    for kind in [name for name in ATTACKS if name.endswith("-crude")]:
        assert (fitted.test_kinds == kind).any(), kind
        keep = (fitted.test_kinds == kind) | ~fitted.test_labels
        assert roc_auc_score(fitted.test_labels[keep], scores[keep]) >= 0.95, kind


def test_predict_flags_about_the_alert_rate_of_normal_sessions(fitted: Fitted) -> None:
    normal = fitted.test.select(~fitted.test_labels)
    rate = fitted.detector.predict(normal).mean()
    assert 0.0 < rate < 0.05  # calibrated at 1% of earlier normal sessions; drift allowed, not 5x
    assert fitted.detector.predict(normal, alert_rate=0.2).mean() > rate


def test_explanations_name_lines_and_odds(fitted: Fitted) -> None:
    i = int(np.argmax(fitted.detector.decision_function(fitted.test)))
    lines = fitted.detector.explain(fitted.test, i, k=1_000)  # every candidate, most surprising first
    events = int(fitted.test.lengths[i]) + int(fitted.test.closes_session[i])
    assert len(lines) == len(CONTEXT) + events + len(FEATURE_NAMES)
    model_lines = [line for line in lines if "under this shop's model" in line]
    assert all("1-in-" in line for line in model_lines)
    assert any(line.startswith("line ") for line in model_lines)  # events point back to their lines
    assert any(line.startswith("events per minute ") for line in model_lines)  # the context, in words
    assert any("of this shop's sessions" in line for line in lines)  # the feature reference, in words


def test_artifact_round_trip_gives_the_same_scores(fitted: Fitted, tmp_path: Path) -> None:
    fitted.detector.save(tmp_path / "det")
    again = BehaviourDetector.load(tmp_path / "det")
    assert again.aggregation == fitted.detector.aggregation
    assert again.threshold() == fitted.detector.threshold()
    np.testing.assert_allclose(
        again.decision_function(fitted.test), fitted.detector.decision_function(fitted.test), rtol=1e-6
    )


def test_the_feature_reference_scores_what_this_shop_rarely_shows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shop = rng.lognormal(size=(2_000, len(FEATURE_NAMES)))
    reference = FeatureReference.fit(shop)
    own = reference.surprise(shop)
    typical = np.median(shop, axis=0, keepdims=True)
    extreme = typical.copy()
    extreme[0, :8] = shop[:, :8].max(0) * 10  # far above every session of the shop on eight features
    together = reference.surprise(np.vstack([typical, extreme]))
    assert together[0] < np.median(own) and together[1] > own.max()
    assert reference.surprise(extreme)[0] == together[1]  # the same, whatever is scored with it
    probes = np.vstack([shop[:500], rng.lognormal(size=(500, len(FEATURE_NAMES))) * 3, extreme])
    np.testing.assert_allclose(
        reference.surprise(probes), -reference.forest.score_samples(probes), rtol=1e-12
    )
    words = reference.describe(extreme[0])
    assert max(words)[1].startswith(f"{FEATURE_NAMES[0]} ") or "higher than 99.9%" in max(words)[1]
    reference.save(tmp_path)
    again = FeatureReference.load(tmp_path)
    np.testing.assert_array_equal(again.surprise(shop), own)
    np.testing.assert_array_equal(again.quantiles, reference.quantiles)
    # a forest of another feature count loads, and would fail only at scoring: refused at loading
    skops.io.dump(IsolationForest().fit(shop[:, :3]), tmp_path / "forest.skops")
    with pytest.raises(FedanomError, match=f"fitted on 3 features, not {len(FEATURE_NAMES)}"):
        FeatureReference.load(tmp_path)
    with pytest.raises(FedanomError, match="no normal training sessions"):
        FeatureReference.fit(shop[:0])


def test_adapter_loads_with_plain_peft(fitted: Fitted, tmp_path: Path) -> None:
    fitted.detector.save(tmp_path / "det")
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(fitted.base), tmp_path / "det" / "adapter"
    )
    ids, mask = pad_batch([fitted.test.framed(0)])
    with torch.inference_mode():
        expected = next_token_nll(fitted.detector.model, ids, mask)
        got = plain_nll(plain(input_ids=ids, attention_mask=mask).logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-5)


def plain_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each token's NLL from a plain transformers model's logits, as fedanom reads them: a context token
    among its own measure's buckets, an event among the whole vocabulary."""
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    for k, (offset, width) in enumerate(zip(CONTEXT_OFFSETS, CONTEXT_WIDTHS, strict=True)):
        own = logits[k, offset : offset + width]
        nll[k] = torch.nn.functional.cross_entropy(own[None], targets[k : k + 1] - offset, reduction="none")[
            0
        ]
    return nll


def test_tampered_adapter_is_refused(fitted: Fitted, tmp_path: Path) -> None:
    fitted.detector.save(tmp_path / "det")
    weights = tmp_path / "det" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FedanomError, match="does not match its checksum"):
        BehaviourDetector.load(tmp_path / "det")


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("halve the calibration", "detector.json does not match its checksum"),
        ("plant a pickle", "adapter_model.bin is not in the detector's checksums.sha256: refused, unread"),
        ("drop an entry, then edit", "adapter_model.safetensors is not in the detector's checksums.sha256"),
        ("delete a file", "popularity.npz is missing from the detector"),
        ("plant a forest, rewrite the manifest", "forest.skops is not an isolation forest fedanom wrote"),
    ],
)
def test_the_manifest_covers_every_file_of_the_detector(
    fitted: Fitted, tmp_path: Path, tamper: str, reason: str
) -> None:
    detector = tmp_path / "det"
    fitted.detector.save(detector)
    manifest = detector / "checksums.sha256"
    if tamper == "halve the calibration":
        spec = json.loads((detector / "detector.json").read_text())
        spec["calibration"]["quantiles"] = [q / 2 for q in spec["calibration"]["quantiles"]]
        (detector / "detector.json").write_text(json.dumps(spec))
    elif tamper == "plant a pickle":
        (detector / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps({"payload": 1}))
    elif tamper == "plant a forest, rewrite the manifest":  # skops loads no type it was not told to
        skops.io.dump({"payload": Fraction(1, 3)}, detector / "forest.skops")
        digest = hashlib.sha256((detector / "forest.skops").read_bytes()).hexdigest()
        lines = manifest.read_text().splitlines(keepends=True)
        manifest.write_text("".join(f"{digest}  forest.skops\n" if "forest" in x else x for x in lines))
    elif tamper == "drop an entry, then edit":
        lines = manifest.read_text().splitlines(keepends=True)
        manifest.write_text("".join(line for line in lines if "safetensors" not in line))
        (detector / "adapter" / "adapter_model.safetensors").write_bytes(b"edited")
    else:
        (detector / "popularity.npz").unlink()
    with pytest.raises(FedanomError, match=re.escape(reason)):
        BehaviourDetector.load(detector)


def test_saving_never_replaces_a_directory_that_is_not_a_detector(fitted: Fitted, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a merchant's own file")
    with pytest.raises(FedanomError, match="exists and is not a detector"):
        fitted.detector.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "a merchant's own file"
    fitted.detector.save(tmp_path / "det")
    fitted.detector.save(tmp_path / "det")  # a detector is replaced whole
    assert BehaviourDetector.load(tmp_path / "det").score_mix == fitted.detector.score_mix


def test_a_different_backbone_is_refused(fitted: Fitted, tmp_path: Path) -> None:
    shutil.copytree(fitted.base, tmp_path / "base")
    fitted.detector.backbone_dir = tmp_path / "base"
    try:
        fitted.detector.save(tmp_path / "det")
    finally:
        fitted.detector.backbone_dir = fitted.base
    save_backbone(build_backbone(BackboneConfig(), seed=7), tmp_path / "base", {"test": "another"})
    with pytest.raises(FedanomError, match="not the one this detector was trained on"):
        BehaviourDetector.load(tmp_path / "det")


def test_any_compatible_model_directory_can_be_the_backbone(tmp_path: Path) -> None:
    plain = build_backbone(BackboneConfig(d_model=32, n_layers=1, n_heads=2), seed=3)
    plain.save_pretrained(tmp_path / "hf")  # plain transformers output, no fedanom metadata
    shop = windows_of(
        generate_shop(ShopConfig(n_events=3_000, n_users=300, n_items=900), seed=4), tmp_path / "s.csv"
    )
    detector = BehaviourDetector.from_backbone(
        tmp_path / "hf", ingest(tmp_path / "s.csv", resolve_preset("taobao")).popularity
    )
    assert np.isfinite(detector.surprise(shop).event).all()
    model, metrics = pretrain_backbone(
        shop,
        BackboneConfig(),
        TrainSettings(dp=False, epochs=1, learning_rate=3e-3),
        start_from=tmp_path / "hf",
    )
    assert model.config.hidden_size == 32  # started from the directory, not from the default config
    assert np.isfinite(metrics["held_out_nll_per_event"])


def test_a_model_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    with pytest.raises(FedanomError, match="vocabulary of 100 tokens"):
        BehaviourDetector.from_backbone(
            tmp_path / "other", Popularity.from_counts(np.zeros(0, np.uint64), np.zeros(0))
        )


def test_supervised_head_trains_on_labels_and_stays_plain_peft_loadable(
    fitted: Fitted, tmp_path: Path
) -> None:
    detector = BehaviourDetector.from_backbone(
        fitted.base, fitted.popularity, lora=LoraSettings(supervised_head=True)
    )
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1.0 / fitted.dev.n_windows)
    detector.fit(fitted.dev, fitted.dev_labels, train=TrainSettings(epochs=3, seed=0), ledger=ledger)
    assert detector.score_mix is not None
    surprise = detector.surprise(fitted.test)
    assert surprise.head is not None and np.ptp(surprise.head) > 0
    scores = detector.decision_function(fitted.test)
    assert roc_auc_score(fitted.test_labels, scores) >= 0.9
    # the trained head on its own already ranks attacks above normal sessions
    assert roc_auc_score(fitted.test_labels, surprise.head) > 0.5
    # the check of the head on training labels answers only when enough known attacks can tell
    normal = fitted.dev.select(fitted.dev_labels == 0)
    few = fitted.dev_labels.copy()
    few[np.flatnonzero(few)[MIN_KNOWN_TO_CHOOSE - 1 :]] = 0
    assert fitted.dev_labels.sum() >= MIN_KNOWN_TO_CHOOSE and few.sum() == MIN_KNOWN_TO_CHOOSE - 1
    assert detector.head_helps(fitted.dev, few, normal) is None
    assert detector.head_helps(fitted.dev, fitted.dev_labels, normal) in (True, False)
    assert fitted.detector.head_helps(fitted.dev, fitted.dev_labels, normal) is None  # it has no head

    detector.save(tmp_path / "det")
    again = BehaviourDetector.load(tmp_path / "det")
    np.testing.assert_allclose(again.decision_function(fitted.test), scores, rtol=1e-5)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(fitted.base), tmp_path / "det" / "adapter"
    )
    ids, mask = pad_batch([fitted.test.framed(0)])
    with torch.inference_mode():
        got = plain_nll(plain(input_ids=ids, attention_mask=mask).logits[0, :-1], ids[0, 1:])
        torch.testing.assert_close(got, next_token_nll(detector.model, ids, mask)[0], rtol=1e-5, atol=1e-5)


def test_one_long_session_is_called_one_session_not_its_windows(tmp_path: Path, tiny_backbone: Path) -> None:
    path = tmp_path / "one-shopper.csv"
    path.write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        + "".join(f"7,{i % 50},1,pv,{1_700_000_000 + i}\n" for i in range(1_000))
    )
    ingested = ingest(path, resolve_preset("taobao"))
    windows = Windows.from_batches(ingested.batches(), ingested.popularity, ingested.report)
    detector = BehaviourDetector.from_backbone(tiny_backbone, ingested.popularity)
    with pytest.raises(FedanomError, match=r"^1 session \(8 windows of up to 128 events\) are too few"):
        detector.fit(windows, train=TrainSettings(dp=False, epochs=1))


@pytest.mark.parametrize(("known", "kinds"), [(12, ("sequence",)), (5, ("sequence", "features"))])
def test_enough_known_attacks_leave_an_uninformative_kind_out_of_the_score(
    known: int, kinds: tuple[str, ...]
) -> None:
    """With at least MIN_KNOWN_TO_CHOOSE known attacks on validation, a kind that does not rank them is
    left out; with fewer, every kind stays in."""
    rng = np.random.default_rng(0)
    labels = np.zeros(400, dtype=np.int8)
    labels[:known] = 1
    evidence = {"sequence": labels * 5.0 + rng.normal(size=400), "features": rng.normal(size=400)}
    scaled = {name: (0.0, 1.0) for name in evidence}
    assert choose_kinds(evidence, labels, scaled) == kinds


@pytest.mark.parametrize(("known", "kinds"), [(12, ("head",)), (5, ("sequence", "features"))])
def test_the_federations_word_keeps_an_unchecked_head_out_but_never_overrules_enough_labels(
    known: int, kinds: tuple[str, ...]
) -> None:
    rng = np.random.default_rng(1)
    labels = np.zeros(400, dtype=np.int8)
    labels[:known] = 1
    evidence = {name: rng.normal(size=400) for name in ("sequence", "features")}
    evidence["head"] = labels * 5.0 + rng.normal(size=400)
    scaled = {name: (0.0, 1.0) for name in evidence}
    assert choose_kinds(evidence, labels, scaled, score_head=False) == kinds
