"""Who the merchant is, where its data and backbone lie, and the answers it already released.

Torch-free on purpose: Flower starts a fresh ClientApp process for every message, and a backbone query
or a round asked again (answered from the reply kept on disk) needs none of the model stack, whose import
costs several seconds (`client.rounds` does the model work).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context

from fedanom.common.backbone import backbone_hash
from fedanom.common.errors import FedanomError
from fedanom.common.prepared import prepare
from fedanom.common.presets import resolve_preset
from fedanom.common.records import Metrics, number, text, to_numpy
from fedanom.common.tokens import Popularity
from fedanom.common.windows import Windows

BACKBONE_HASHES = "backbone-hashes.json"  # the backbone directories' hashes, with their files' stamps


@dataclass(frozen=True)
class Merchant:
    """A merchant as its ClientApp sees it. A SuperNode's node config describes it (`from_node`); a
    simulation resolves each virtual merchant from its partition id instead (`Resolver`)."""

    data: Path
    preset: str | None
    state_dir: Path
    epsilon: float
    base: Path | None  # the merchant's own copy of the backbone, if it has one
    labels: Path | None = None  # known attacks among its sessions, to measure the global detector with
    simulated: bool = False  # a research run: its DP noise is seeded per round, so it can be reproduced

    @classmethod
    def from_node(cls, context: Context) -> Merchant:
        """The merchant a real SuperNode serves, from its node config (written by `fedanom client`)."""
        node = context.node_config
        return cls(
            data=Path(text(node, "data")),
            preset=text(node, "preset") or None,
            state_dir=Path(text(node, "state-dir", ".fedanom-state")),
            epsilon=number(node, "epsilon"),
            base=Path(text(node, "base")) if text(node, "base") else None,
            labels=Path(text(node, "labels")) if text(node, "labels") else None,
        )

    def backbone(self, expected_hash: str) -> Path | None:
        """The backbone directory with this content hash, if the merchant holds it."""
        for candidate in (self.base, self.state_dir / "backbones" / expected_hash):
            if (
                candidate is not None
                and (candidate / "config.json").exists()
                and backbone_hash(candidate, cache=self.state_dir / BACKBONE_HASHES) == expected_hash
            ):
                return candidate
        return None

    def require_backbone(self, config: Mapping[str, object]) -> Path:
        expected = text(config, "backbone-hash")
        found = self.backbone(expected)
        if found is None:
            raise FedanomError(
                f"this merchant does not hold the backbone {expected[:12]} and none was shipped"
            )
        return found

    def windows(self) -> tuple[Windows, Windows, Popularity]:
        """This merchant's sessions to train on and to validate on (`Windows.holdout`), prepared once and
        kept in its state directory (`common.prepared`)."""
        prepared = prepare(self.data, resolve_preset(self.preset), self.state_dir)
        return prepared.train, prepared.validation, prepared.popularity

    def reply_path(self, this_round: int, arrays: ArrayRecord) -> Path:
        """Where this merchant keeps its answer to one round on one global adapter."""
        digest = hashlib.sha256()
        for name, value in sorted(to_numpy(arrays).items()):
            digest.update(name.encode() + value.tobytes())
        return self.state_dir / "replies" / f"round-{this_round}-{digest.hexdigest()[:16]}.npz"


Resolver = Callable[[Context], Merchant]  # which merchant a message's ClientApp process serves


def keep_reply(path: Path, update: Mapping[str, np.ndarray], metrics: Metrics) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **update, **{f"metric:{k}": np.float64(v) for k, v in metrics.items()})  # type: ignore[arg-type]


def kept_reply(path: Path, metric_keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], Metrics]:
    """The update and metrics a merchant released for this round before: re-sending them is
    post-processing and spends no privacy."""
    with np.load(path) as saved:
        # a reply kept by an earlier version may lack metrics added since: it is re-sent without them
        metrics: Metrics = {
            key: float(saved[f"metric:{key}"]) for key in metric_keys if f"metric:{key}" in saved
        }
        update = {name: saved[name] for name in saved.files if not name.startswith("metric:")}
    return update, metrics


@dataclass(frozen=True)
class VirtualMerchants:
    """A simulation's merchants, by the virtual SuperNode's partition id: merchant k reads `data[k]`
    (with `labels[k]`, where it knows attacks) and keeps its state in `<state_root>/merchant-k`. Their
    DP noise is seeded per round, so a research run repeats."""

    data: tuple[Path, ...]
    state_root: Path
    base: Path
    epsilon: float
    labels: tuple[Path | None, ...] = ()
    preset: str | None = "taobao"

    def __call__(self, context: Context) -> Merchant:
        k = int(number(context.node_config, "partition-id")) % len(self.data)
        return Merchant(
            data=self.data[k],
            preset=self.preset,
            state_dir=self.state_root / f"merchant-{k}",
            epsilon=self.epsilon,
            base=self.base,
            labels=self.labels[k] if self.labels else None,
            simulated=True,
        )
