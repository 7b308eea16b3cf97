"""Settings with their defaults: the backbone's shape, the adapter, local training, the run config.

Plain data with no torch, transformers or Flower import, so the command line can show these defaults
in `--help` and check a user's options in a second instead of loading the model stack first. The code
that builds and trains models (`common.detector.model`, `common.detector.training`) reads them from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedanom.common.errors import FedanomError

ARCHITECTURE_NAMES = ("gpt2", "llama")  # detector.model.ARCHITECTURES builds each (a test keeps them equal)
EPSILON = 8.0  # a merchant's total privacy budget unless it names its own
AGGREGATIONS = (
    "fedavg",
    "trimmed-mean",
    "median",
)  # server.aggregation.AGGREGATORS does each (a test keeps them equal)
PRIVACY_UNITS = ("session", "user")  # what DP-SGD samples, clips and counts as one
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
    max_grad_norm: float = 1.0  # clipping bound per privacy unit
    dp: bool = True
    # what DP protects as one unit: a shopper with all their sessions, of which at most
    # `max_windows_per_user` are drawn each time the shopper is sampled (an export without shopper ids
    # makes each session its own shopper), or a session (one scored window)
    privacy_unit: str = "user"
    max_windows_per_user: int = 8
    grad_sample_mode: str = "hooks"
    # None: sampling and DP noise come from a seed drawn from the OS's entropy, so nobody can regenerate
    # the noise and subtract it (every deployed run); a number makes a research run reproducible
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.privacy_unit not in PRIVACY_UNITS:
            raise FedanomError(
                f"the privacy unit must be one of {', '.join(PRIVACY_UNITS)}, not {self.privacy_unit}"
            )
        if self.batch_size < 1 or not self.epochs > 0:
            raise FedanomError(
                f"the batch size ({self.batch_size}) and epochs ({self.epochs:g}) must be positive"
            )
        if self.max_windows_per_user < 1:
            raise FedanomError(
                f"a shopper's windows per draw must be at least 1, not {self.max_windows_per_user}"
            )

    def steps_for(self, units: int) -> int:
        """Optimizer steps over `units` privacy units (sessions or shoppers; `detector.training.
        privacy_units`): training takes them and the privacy ledger plans its noise for them, so both
        ask here. `batch_size` is in units."""
        return max(1, math.ceil(self.epochs * units / min(self.batch_size, units)))


# The pretraining an operator runs (`fedanom pretrain`, and `simulate`'s backbone): every weight, public
# data, no DP, a few epochs at a larger step than DP-SGD's
PRETRAIN = TrainSettings(epochs=2.0, learning_rate=3e-3, dp=False)


@dataclass(frozen=True)
class RunSettings:
    """The federation's run config, typed; its Flower form (`to_config`) has the same names with hyphens.

    pyproject.toml's [tool.flwr.app.config] repeats the defaults for `flwr run` (a test keeps the two
    equal); the `fedanom server` and `simulate` options show them and override them. The adapter's and
    training's defaults are the dataclasses' above.
    """

    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_nodes: int = 2
    expect_nodes: int = 0  # merchants to wait for before round 1 (0: min_nodes)
    round_timeout: float = 600.0
    aggregation: str = "fedavg"
    norm_bound: float = 0.0  # 0: from the learning rate (`server.aggregation.default_norm_bound`)
    resume: bool = False
    run_dir: str = "runs/fedanom"
    base: str = "base"
    local_epochs: float = 1.0
    batch_size: int = TrainSettings.batch_size
    learning_rate: float = TrainSettings.learning_rate
    max_grad_norm: float = TrainSettings.max_grad_norm
    lora_rank: int = LoraSettings.rank
    lora_alpha: int = LoraSettings.alpha
    lora_seed: int = LoraSettings.seed
    lora_targets: str = ""  # comma-separated; empty: the architecture's default
    supervised_head: bool = LoraSettings.supervised_head
    dp: bool = TrainSettings.dp
    privacy_unit: str = TrainSettings.privacy_unit
    max_windows_per_user: int = TrainSettings.max_windows_per_user
    require_dp: bool = False  # the operator's privacy policy (`common.policy`): merchants must train with DP,
    max_epsilon: float = 0.0  # within this total budget (0: any),
    max_delta: float = 0.0  # and this δ (0: any)

    def __post_init__(self) -> None:
        self.local_settings()  # a privacy unit that is not one, said here too
        if self.aggregation not in AGGREGATIONS:
            raise FedanomError(
                f"the aggregation must be one of {', '.join(AGGREGATIONS)}, not {self.aggregation}"
            )
        if not 0 <= self.norm_bound < math.inf:
            raise FedanomError(f"the norm bound {self.norm_bound:g} must be positive, or 0 for the default")

    def to_config(self) -> dict[str, bool | float | int | str]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RunSettings:
        """A Flower run config as settings (a key it lacks keeps its default): a value of the wrong type
        is a user's mistake, said in one sentence, and never read as something else (a text "false" as
        true, a float as a round count)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                values[f.name] = _typed(key, config[key], getattr(cls, f.name))
        return cls(**values)

    def local_settings(self, rounds: int = 1) -> TrainSettings:
        """What a merchant does in `rounds` rounds in one go: local-only and centralized
        training in a simulation train as long as the federation's merchants do in all its rounds."""
        return TrainSettings(
            epochs=rounds * self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_grad_norm=self.max_grad_norm,
            dp=self.dp,
            privacy_unit=self.privacy_unit,
            max_windows_per_user=self.max_windows_per_user,
        )


def _typed(key: str, value: object, default: object) -> object:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "a whole number"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        wanted = "a number"
        value = float(value) if ok else value  # type: ignore[arg-type]
    else:
        ok = isinstance(value, str)
        wanted = "text"
    if not ok:
        raise FedanomError(f"config value '{key}' must be {wanted}, not {value!r}")
    return value


RUN_DEFAULTS = RunSettings().to_config()
