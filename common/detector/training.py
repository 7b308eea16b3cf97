"""A merchant's local training of the LoRA adapter, with Opacus DP-SGD by default.

The same loop serves `fedanom train` (a local fit), the federated client (one round's local steps) and
the simulations' local-only and non-DP baselines. With DP, each step samples sessions with Poisson
sampling, clips every session's gradient to `max_grad_norm` and adds Gaussian noise; the noise is
planned from the merchant's ledger so the run fits in its remaining budget, and the ledger records the
steps actually taken.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

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


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([seq for seq, _ in examples])
    return ids, mask, torch.tensor([label for _, label in examples], dtype=torch.float32)


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
    loader: DataLoader[Example],
    *,
    settings: TrainSettings,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    poisson_sampling: bool = True,
) -> tuple[GradSampleModule, torch.optim.Optimizer, DataLoader[Example], PrivacyEngine]:
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
    # Opacus's secure_mode needs torchcsprng, which has no build for this torch: a fresh 64-bit seed from
    # the OS per run makes the noise unpredictable instead (the "at least" option)
    torch.manual_seed(settings.seed if settings.seed is not None else secrets.randbits(64))
    started = time.perf_counter()
    n = windows.n_windows
    batch_size = min(settings.batch_size, n)
    steps = settings.steps_for(n)
    loader: DataLoader[Example] = DataLoader(
        _Framed(windows, labels), batch_size=batch_size, shuffle=True, collate_fn=collate
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    engine = None
    noise = None
    run = ""
    rate = 1.0 / len(loader)  # Opacus's Poisson loader samples at 1 / len(loader), not batch_size / n
    train_model: torch.nn.Module = model
    if settings.dp:
        assert ledger is not None
        # a federation plans for every round still to come, so one round cannot spend the whole budget
        noise, run = ledger.reserve(rate, steps, planned_steps or 0)  # planned with what Opacus accounts
        train_model, optimizer, loader, engine = make_private(
            model, optimizer, loader, settings=settings, ledger=ledger, noise_multiplier=noise
        )
    train_model.train()
    losses = []
    taken = 0
    try:
        for ids, mask, known in _forever(loader):
            if taken == steps:
                break
            if ids.numel() == 0:  # an empty Poisson sample: nothing to release, no step taken
                continue
            loss = sequence_loss(train_model, ids.to(device), mask.to(device), known.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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


def _forever(loader: DataLoader[Example]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader
