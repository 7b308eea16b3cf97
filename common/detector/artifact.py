"""The detector on disk: one directory a merchant can score with, and that plain `peft` can load.

    detector/
      detector.json      format, vocabulary version, backbone reference (content hash + where it lies),
                         LoRA and session settings, score aggregation, calibration, provenance
      adapter/           peft `save_pretrained` output (adapter_config.json, adapter_model.safetensors)
      popularity.npz     this shop's item popularity counts (hashed ids; never leaves the merchant)
      reference.npz      quantiles of this shop's session features (never leaves the merchant)
      forest.skops       the isolation forest over them that scores sessions (never leaves the merchant)
      checksums.sha256   every other file's SHA-256, detector.json's too (`sha256sum -c` reads it)

A backbone directory is `save_pretrained` output plus `fedanom-backbone.json` with its content hash.
Loading checks the manifest before it reads anything else, then the backbone hash: an edited calibration,
a changed or planted file, a missing one or a different backbone is a clear error, never a silently
wrong score. (A checksum is no signature: whoever may write the directory may rewrite the manifest too.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedanom.common.backbone import BACKBONE_META, backbone_hash, content_hash, sha256_file, weight_files
from fedanom.common.detector.model import add_anomaly_head
from fedanom.common.detector.reference import FeatureReference
from fedanom.common.errors import FedanomError
from fedanom.common.tokens import VOCAB_SIZE, VOCAB_VERSION, Popularity

DETECTOR_FORMAT = "fedanom-detector/4"
MANIFEST = "checksums.sha256"
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)


# --------------------------------------------------------------------------------------------- backbone
def save_backbone(model: PreTrainedModel, directory: str | Path, provenance: dict[str, Any]) -> str:
    """`save_pretrained` plus a content hash; returns the hash."""
    directory = Path(directory)
    model.save_pretrained(directory)
    digest = content_hash(directory, weight_files(directory))
    meta = {"hash": digest, "vocabulary_version": VOCAB_VERSION, "provenance": provenance}
    (directory / BACKBONE_META).write_text(json.dumps(meta, indent=2))
    return digest


def load_backbone(directory: str | Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """Any causal-LM directory over the behaviour vocabulary; fedanom's own are hash-checked."""
    directory = Path(directory)
    digest = backbone_hash(directory)
    meta_path = directory / BACKBONE_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("hash") != digest:
            raise FedanomError(
                f"{directory}: the backbone weights do not match their recorded hash (modified?)"
            )
        if meta.get("vocabulary_version") != VOCAB_VERSION:
            raise FedanomError(
                f"{directory} was trained on vocabulary {meta.get('vocabulary_version')}, "
                f"this fedanom speaks {VOCAB_VERSION}"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise FedanomError(f"{directory} cannot be loaded as a causal language model ({exc})") from None
    if model.config.vocab_size != VOCAB_SIZE:
        raise FedanomError(
            f"{directory} has a vocabulary of {model.config.vocab_size} tokens; "
            f"behaviour tokens need {VOCAB_SIZE}"
        )
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only


# ----------------------------------------------------------------------------------------------- detector
@dataclass
class Calibration:
    """Normal validation scores, kept as quantiles so any alert rate maps to a threshold."""

    alert_rate: float
    quantiles: list[float]
    n_validation: int

    @classmethod
    def from_scores(cls, scores: np.ndarray, alert_rate: float) -> Calibration:
        if not len(scores):
            raise FedanomError("no normal validation sessions to calibrate the threshold on")
        return cls(alert_rate, np.quantile(scores, QUANTILE_LEVELS).tolist(), len(scores))

    def threshold(self, alert_rate: float | None = None) -> float:
        rate = self.alert_rate if alert_rate is None else alert_rate
        if not 0 < rate < 1:
            raise FedanomError(f"the alert rate must be between 0 and 1, not {rate}")
        return float(np.interp(1.0 - rate, QUANTILE_LEVELS, self.quantiles))


@dataclass
class DetectorSpec:
    backbone: dict[str, Any]  # hash, path (as given), architecture
    lora: dict[str, Any]
    session: dict[str, Any]
    aggregation: str
    calibration: Calibration
    provenance: dict[str, Any]
    # per kind of evidence (sequence, features, head): median and scale on normal validation windows
    score_mix: dict[str, float] | None = None
    vocabulary_version: str = VOCAB_VERSION
    format: str = DETECTOR_FORMAT


def save_detector(
    directory: str | Path,
    model: PeftModel,
    spec: DetectorSpec,
    popularity: Popularity,
    reference: FeatureReference,
) -> None:
    """Written beside the target, then moved into place: a reader never sees half a detector, and no
    file of an earlier save lingers outside the new manifest."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / "detector.json").exists():
        raise FedanomError(f"{directory} exists and is not a detector: refusing to replace what it holds")
    staging = directory.with_name(f".{directory.name}.saving-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging / "adapter"))
    popularity.save(staging / "popularity.npz")
    reference.save(staging)
    (staging / "detector.json").write_text(json.dumps(asdict(spec), indent=2))
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    lines = [f"{sha256_file(p)}  {p.relative_to(staging).as_posix()}\n" for p in files]
    (staging / MANIFEST).write_text("".join(lines))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def check_manifest(directory: Path) -> None:
    """Every file of the detector is in its manifest with its checksum, and every entry is there."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise FedanomError(f"{directory} has no {MANIFEST}: not a detector this fedanom wrote, or damaged")
    listed: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(errors="replace").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise FedanomError(f"{manifest}, line {number}: not a '<sha256>  <file in the detector>' line")
        listed[name] = digest
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(present - set(listed)):
        raise FedanomError(f"{directory / name} is not in the detector's {MANIFEST}: refused, unread")
    for name, digest in listed.items():
        file = directory / name
        if not file.is_file():
            raise FedanomError(f"{file} is missing from the detector")
        if sha256_file(file) != digest:
            raise FedanomError(f"{file} does not match its checksum in {MANIFEST} (modified or corrupt)")


def read_spec(directory: str | Path) -> DetectorSpec:
    directory = Path(directory)
    path = directory / "detector.json"
    if not path.exists():
        raise FedanomError(f"{directory} is not a fedanom detector (no detector.json)")
    check_manifest(directory)
    try:
        raw = json.loads(path.read_text())
        raw["calibration"] = Calibration(**raw["calibration"])
        spec = DetectorSpec(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise FedanomError(f"{path} is not a readable detector description ({exc})") from None
    if spec.format != DETECTOR_FORMAT:
        raise FedanomError(f"{path} has format {spec.format}; this fedanom reads {DETECTOR_FORMAT}")
    if spec.vocabulary_version != VOCAB_VERSION:
        raise FedanomError(
            f"{path} speaks vocabulary {spec.vocabulary_version}; this fedanom speaks {VOCAB_VERSION}"
        )
    return spec


def resolve_backbone_path(directory: Path, spec: DetectorSpec) -> Path:
    """The backbone as recorded: relative paths are relative to the detector directory."""
    path = Path(spec.backbone["path"])
    return path if path.is_absolute() else (directory / path).resolve()


def load_detector(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[PeftModel, DetectorSpec, Popularity, FeatureReference]:
    directory = Path(directory)
    spec = read_spec(directory)
    backbone_dir = resolve_backbone_path(directory, spec)
    if not backbone_dir.exists():
        raise FedanomError(f"{directory}: its backbone {backbone_dir} is not on this machine")
    if backbone_hash(backbone_dir) != spec.backbone["hash"]:
        raise FedanomError(
            f"{directory}: the backbone at {backbone_dir} is not the one this detector was trained on"
        )
    backbone = load_backbone(backbone_dir, device)
    if spec.lora.get("supervised_head"):
        add_anomaly_head(backbone)
    model = PeftModel.from_pretrained(backbone, directory / "adapter")
    popularity = Popularity.load(directory / "popularity.npz")
    return model.to(device), spec, popularity, FeatureReference.load(directory)


def relative_or_absolute(target: Path, start: Path) -> str:
    """A path to record: relative when both sit under one tree (moves with it), else absolute."""
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:
        return str(target.resolve())
