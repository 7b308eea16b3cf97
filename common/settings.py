"""Settings with their defaults: the backbone's shape, the adapter, local training, the run config.

Plain data with no torch, transformers or Flower import, so the command line can show these defaults
in `--help` and check a user's options in a second instead of loading the model stack first. The code
that builds and trains models (`common.model`, `client.training`) reads them from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ARCHITECTURE_NAMES = ("gpt2", "llama")  # detector.model.ARCHITECTURES builds each (a test keeps them equal)
EPSILON = 8.0  # a merchant's total privacy budget unless it names its own
ALERT_RATE = 0.01  # the share of normal sessions a detector flags unless the merchant asks for another


@dataclass(frozen=True)
class BackboneConfig:
    """Size and shape of the behaviour transformer (`common.model.build_backbone` builds it)."""

    architecture: str = "llama"  # one of ARCHITECTURE_NAMES; chosen by measurement (BENCHMARKS.md)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_events: int = 128  # the session window; positions = window + <bos> + context + <eos>
    dropout: float = 0.0


@dataclass(frozen=True)
class LoraSettings:
    """The adapter every merchant trains."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = field(default=())  # empty: the architecture's default (model.ARCHITECTURES)
    ffa: bool = True  # FFA-LoRA: A frozen (shared seed), only B trained and sent
    seed: int = 0  # draws A; must be the same for every merchant of a federation
    supervised_head: bool = False  # a trained anomaly logit, for merchants with labelled sessions

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TrainSettings:
    """One local training run (`detector.training.train_model`)."""

    epochs: float = 3.0
    batch_size: int = 64  # expected batch size (Poisson sampling under DP)
    # Adam under DP-SGD noise: at 0.02 the anomaly head hardly learned in two rounds (BENCHMARKS.md)
    learning_rate: float = 1e-2
    max_grad_norm: float = 1.0  # per-session clipping bound
    dp: bool = True
    grad_sample_mode: str = "hooks"
    # None: sampling and DP noise come from a seed drawn from the OS's entropy, so nobody can regenerate
    # the noise and subtract it (every deployed run); a number makes a research run reproducible
    seed: int | None = None

    def steps_for(self, sessions: int) -> int:
        """Optimizer steps over `sessions` training windows: training takes them and the privacy ledger
        plans its noise for them, so both ask here."""
        return max(1, math.ceil(self.epochs * sessions / min(self.batch_size, sessions)))


# The federation's run config with its defaults, the dataclasses' where they share a setting.
# pyproject.toml's [tool.flwr.app.config] repeats them for `flwr run` (a test keeps the two equal), and the
# `fedanom server` options show them; `fedanom server` / `simulate` override them.
RUN_DEFAULTS: dict[str, bool | float | int | str] = {
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "min-nodes": 2,
    "expect-nodes": 0,
    "round-timeout": 600.0,
    "aggregation": "fedavg",
    "norm-bound": 0.0,
    "resume": False,
    "run-dir": "runs/default",
    "base": "base",
    "local-epochs": 1.0,
    "batch-size": TrainSettings.batch_size,
    "learning-rate": TrainSettings.learning_rate,
    "max-grad-norm": TrainSettings.max_grad_norm,
    "lora-rank": LoraSettings.rank,
    "lora-alpha": LoraSettings.alpha,
    "lora-seed": LoraSettings.seed,
    "lora-targets": "",
    "supervised-head": LoraSettings.supervised_head,
    "dp": TrainSettings.dp,
    "require-dp": False,  # the operator's privacy policy (`common.policy`): merchants must train with DP,
    "max-epsilon": 0.0,  # within this total budget (0: any),
    "max-delta": 0.0,  # and this δ (0: any)
}
