"""A merchant's local training of the LoRA adapter, with Opacus DP-SGD by default.

The same loop serves `fedanom train` (a local fit), the federated client (one round's local steps) and
the simulations' local-only and non-DP baselines. With DP, each step samples privacy units with Poisson
sampling, clips every unit's gradient to `max_grad_norm` and adds Gaussian noise; the noise is planned
from the merchant's ledger so the run fits in its remaining budget, and the ledger records the steps
actually taken.

The unit is a session (one scored window) or a shopper. With shoppers, Opacus samples shoppers, its
hooks compute every window's gradient, and `per_shopper` sums each shopper's before Opacus's optimizer
clips, noises and averages them as it would any sample: the grouping is the only part that is
fedanom's, the per-sample gradients, noise and accountant are Opacus's. A shopper with many sessions
(a heavy user, or a bot) then weighs as one, and ε is what one shopper risks.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from torch.utils.data import DataLoader, Dataset

from fedanom.common.detector.model import forward, pad_batch
from fedanom.common.detector.privacy import PrivacyLedger
from fedanom.common.errors import FedanomError
from fedanom.common.settings import TrainSettings
from fedanom.common.windows import Windows

GRAD_SAMPLE_MODES = ("hooks", "functorch")  # "ew" fails on HF models; ghost needs its own loss wrapper


@dataclass
class TrainReport:
    steps: int
    sessions: int
    mean_loss: float
    seconds: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None  # Poisson sampling rate of a DP run, as its accountant counts it
    epsilon_spent: float | None = None  # total for this merchant after the run
    delta: float | None = None
    noise: str = "seeded"  # "seeded" (reproducible research run) or "os-entropy" (unpredictable)


Example = tuple[np.ndarray, float]  # a framed window and its label (-1: unknown)


class _Framed(Dataset[Example]):
    def __init__(self, windows: Windows, labels: np.ndarray | None) -> None:
        self.windows = windows
        self.labels = labels

    def __len__(self) -> int:
        return self.windows.n_windows

    def __getitem__(self, i: int) -> Example:
        return self.windows.framed(i), float(self.labels[i]) if self.labels is not None else -1.0


class _Shoppers(Dataset[list[Example]]):
    """One item per shopper: their windows (at most `cap`, drawn afresh each time they are sampled, from
    torch's generator, which the run seeds), the unit of user-level DP-SGD."""

    def __init__(self, windows: Windows, labels: np.ndarray | None, cap: int) -> None:
        self.framed, self.cap = _Framed(windows, labels), cap
        shopper = _shopper_of(windows)
        order = np.argsort(shopper, kind="stable")
        self.groups = np.split(order, np.flatnonzero(np.diff(shopper[order])) + 1)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> list[Example]:
        group = self.groups[k]
        if len(group) > self.cap:
            group = group[torch.randperm(len(group))[: self.cap].sort().values.numpy()]
        return [self.framed[int(i)] for i in group]


def privacy_units(windows: Windows, settings: TrainSettings) -> int:
    """How many units DP-SGD samples from: the windows (sessions), or the shoppers they belong to."""
    if settings.privacy_unit == "session" or windows.n_windows == 0:
        return windows.n_windows
    return int(_shopper_of(windows).max()) + 1


def _shopper_of(windows: Windows) -> np.ndarray:
    """Each window's shopper, numbered 0..shoppers-1: the one grouping the sampling and the count share."""
    return np.unique(windows.user.astype(str), return_inverse=True)[1]


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([seq for seq, _ in examples])
    return ids, mask, torch.tensor([label for _, label in examples], dtype=torch.float32)


def collate_shoppers(shoppers: list[list[Example]]) -> tuple[torch.Tensor, ...]:
    """The sampled shoppers' windows as one batch, and which shopper (0..k-1) each window is."""
    ids, mask, labels = collate([example for windows in shoppers for example in windows])
    owner = torch.tensor([k for k, windows in enumerate(shoppers) for _ in windows], dtype=torch.int64)
    return ids, mask, labels, owner


def per_shopper(model: torch.nn.Module, owner: torch.Tensor, shoppers: int) -> None:
    """Turn Opacus's per-window gradients into per-shopper ones (each the sum over the shopper's
    windows), so that its optimizer clips, noises and counts each shopper as one."""
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            shape, device = (shoppers, *grad_sample.shape[1:]), grad_sample.device
            summed = torch.zeros(shape, dtype=grad_sample.dtype, device=device)
            p.grad_sample = summed.index_add_(0, owner.to(device), grad_sample)  # type: ignore[attr-defined]


def sequence_loss(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over sessions of a per-session loss (as DP-SGD needs): the session's mean next-token NLL,
    except for known attacks (label 1), plus the supervised head's cross-entropy where the session has
    a label. A known attack never teaches the sequence model that it is normal: on real exports with
    bots in the training period, learning them cost the sequence score most of its AUPRC (BENCHMARKS.md,
    session 8)."""
    nll, logit = forward(model, ids, mask)
    loss = nll.sum(1) / mask[:, 1:].sum(1).clamp(min=1)
    if labels is not None:
        loss = torch.where(labels == 1, torch.zeros_like(loss), loss)
    if logit is not None and labels is not None:
        known = labels >= 0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logit, labels.clamp(min=0), reduction="none"
        )
        loss = loss + torch.where(known, bce, torch.zeros_like(bce))
    return loss.mean()


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    settings: TrainSettings,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    poisson_sampling: bool = True,
) -> tuple[GradSampleModule, torch.optim.Optimizer, DataLoader[Any], PrivacyEngine]:
    """Opacus around model/optimizer/loader, its accountant preloaded with the merchant's history."""
    if settings.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise FedanomError(f"grad sample mode must be one of {', '.join(GRAD_SAMPLE_MODES)}")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(ledger.history)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=settings.grad_sample_mode,
    )
    dp_model, dp_optimizer, dp_loader = private[0], private[1], private[-1]
    return dp_model, dp_optimizer, dp_loader, engine


def train_model(
    model: torch.nn.Module,
    windows: Windows,
    settings: TrainSettings,
    *,
    labels: np.ndarray | None = None,
    ledger: PrivacyLedger | None = None,
    planned_steps: int | None = None,
    device: torch.device | str = "cpu",
) -> TrainReport:
    """Train the model's trainable parameters on these windows, in place: the adapter (merchants), or
    every weight when nothing is frozen (the operator's backbone pretraining, without DP)."""
    if windows.n_windows < 2:
        raise FedanomError("training needs at least 2 sessions")
    if settings.dp and ledger is None:
        raise ValueError("DP training needs a privacy ledger")
    if settings.dp and ledger is not None and ledger.unit != settings.privacy_unit:
        raise FedanomError(f"this privacy ledger counts ε per {ledger.unit}, not per {settings.privacy_unit}")
    # Opacus's secure_mode needs torchcsprng, which has no build for this torch: a fresh 64-bit seed from
    # the OS per run makes the noise unpredictable instead (the "at least" option)
    torch.manual_seed(settings.seed if settings.seed is not None else secrets.randbits(64))
    started = time.perf_counter()
    n = windows.n_windows
    by_user = settings.dp and settings.privacy_unit == "user"
    units = privacy_units(windows, settings) if settings.dp else n
    batch_size = min(settings.batch_size, units)
    steps = settings.steps_for(units)
    loader: DataLoader[Any]
    if by_user:
        shoppers = _Shoppers(windows, labels, settings.max_windows_per_user)
        loader = DataLoader(shoppers, batch_size=batch_size, shuffle=True, collate_fn=collate_shoppers)
    else:
        loader = DataLoader(_Framed(windows, labels), batch_size=batch_size, shuffle=True, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    engine = None
    noise = None
    run = ""
    rate = 1.0 / len(loader)  # Opacus's Poisson loader samples at 1 / len(loader), not batch_size / n
    train_model: torch.nn.Module = model
    model.train()  # Opacus refuses a model in eval mode, which scoring before training leaves it in
    if settings.dp:
        assert ledger is not None
        # a federation plans for every round still to come, so one round cannot spend the whole budget
        noise, run = ledger.reserve(rate, steps, planned_steps or 0)  # planned with what Opacus accounts
        train_model, optimizer, loader, engine = make_private(
            model, optimizer, loader, settings=settings, ledger=ledger, noise_multiplier=noise
        )
    losses = []
    taken = 0
    try:
        for ids, mask, known, *owner in _forever(loader):
            if taken == steps:
                break
            if ids.numel() == 0:  # an empty Poisson sample: nothing to release, no step taken
                continue
            loss = sequence_loss(train_model, ids.to(device), mask.to(device), known.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if owner:
                per_shopper(train_model, owner[0], int(owner[0].max()) + 1)
            optimizer.step()
            losses.append(loss.item())
            taken += 1
    finally:  # the steps taken are spent, whether or not the run got to its end
        if engine is not None and ledger is not None:
            ledger.settle(run, taken)
    report = TrainReport(
        steps=taken,
        sessions=n,
        mean_loss=float(np.mean(losses)),
        seconds=time.perf_counter() - started,
        noise="seeded" if settings.seed is not None else "os-entropy",
    )
    if engine is not None and ledger is not None:
        report.noise_multiplier, report.epsilon_spent, report.delta = noise, ledger.spent(), ledger.delta
        report.sample_rate = rate
        train_model._close()  # type: ignore[operator]  # removes Opacus's hooks from the model
    model.eval()
    return report


def _forever(loader: DataLoader[Any]) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader
