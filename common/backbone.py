"""A backbone directory's files: their content hash, and shipping them to a merchant that lacks them.

A backbone is `save_pretrained` output (config.json and safetensors weights) plus `fedanom-backbone.json`
with its content hash. Detectors record that hash and a federation announces it; a merchant answers the
server's query about it (and installs shipped files) with this module alone, without loading torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from fedanom.common.errors import FedanomError

BACKBONE_META = "fedanom-backbone.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(directory: Path, names: list[str]) -> str:
    """One hash over the named files' contents (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + sha256_file(directory / name).encode())
    return digest.hexdigest()


def weight_files(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"
    )


def backbone_hash(directory: str | Path) -> str:
    directory = Path(directory)
    if not directory.is_dir() or not (directory / "config.json").exists():
        raise FedanomError(f"{directory} is not a model directory (no config.json)")
    return content_hash(directory, weight_files(directory))


def backbone_files(directory: str | Path) -> dict[str, bytes]:
    """The files that make up a backbone, by name, for shipping it to a merchant that lacks it."""
    directory = Path(directory)
    names = weight_files(directory) + ([BACKBONE_META] if (directory / BACKBONE_META).exists() else [])
    return {name: (directory / name).read_bytes() for name in names}


def install_backbone(files: dict[str, bytes], expected_hash: str, directory: str | Path) -> Path:
    """Write shipped backbone files to `directory` only if their content hash is the announced one."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a half-written earlier attempt
    staging.mkdir(parents=True)
    for name, data in files.items():
        if Path(name).name != name:
            raise FedanomError(f"a shipped backbone file has a path in its name ('{name}'); refused")
        (staging / name).write_bytes(data)
    received = backbone_hash(staging)
    if received != expected_hash:
        raise FedanomError(
            f"the shipped backbone hashes to {received[:12]}, not the announced {expected_hash[:12]}; refused"
        )
    shutil.rmtree(directory, ignore_errors=True)  # whatever lay there did not hash right, or it is this
    os.replace(staging, directory)
    return directory
