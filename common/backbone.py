"""A backbone directory's files: their content hash, and shipping them to a merchant that lacks them.

A backbone is `save_pretrained` output (config.json and safetensors weights) plus `fedanom-backbone.json`
with its content hash. Detectors record that hash and a federation announces it; a merchant answers the
server's query about it (and installs shipped files) with this module alone, without loading torch.
"""

from __future__ import annotations

import hashlib
import json
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


def backbone_hash(directory: str | Path, cache: Path | None = None) -> str:
    """The directory's content hash, computed once per state of its files. It is remembered with each
    weight file's size, mtime, ctime, inode and device: in this process and, given `cache` (a JSON
    file), across processes, since a merchant's every message is a fresh process that asks several
    times. A file changed in any of these is hashed again."""
    directory = Path(directory)
    if not directory.is_dir() or not (directory / "config.json").exists():
        raise FedanomError(f"{directory} is not a model directory (no config.json)")
    names = weight_files(directory)
    key = str(directory.resolve())
    stamps = [[name, *_stamp(directory / name)] for name in names]
    known = _read_hashes(cache) if cache is not None else {}
    remembered = [_hash_if(entry, stamps) for entry in (_HASHES.get(key), known.get(key))]
    digest = next((d for d in remembered if d is not None), None) or content_hash(directory, names)
    _HASHES[key] = {"stamps": stamps, "hash": digest}
    if cache is not None and known.get(key) != _HASHES[key]:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        staging.write_text(json.dumps({**known, key: _HASHES[key]}))
        os.replace(staging, cache)
    return digest


_HASHES: dict[str, object] = {}  # this process's: resolved directory -> {"stamps": ..., "hash": ...}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]  # ctime: no tool sets it back


def _hash_if(entry: object, stamps: list[list[object]]) -> str | None:
    """A remembered hash, if it was taken of files in exactly this state."""
    if isinstance(entry, dict) and entry.get("stamps") == stamps and isinstance(entry.get("hash"), str):
        return str(entry["hash"])
    return None


def _read_hashes(cache: Path) -> dict[str, object]:
    """The remembered hashes, or none when the file is missing or unreadable (it is then rewritten)."""
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


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
