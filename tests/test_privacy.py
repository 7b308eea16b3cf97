"""Differential privacy: Opacus's gradients are what they claim, ε is the accountant's, the budget holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

from fedanom.common.detector.model import attach_lora, build_backbone, pad_batch, trainable_state
from fedanom.common.detector.privacy import LEDGER_FILE, BudgetExhausted, PrivacyLedger
from fedanom.common.detector.training import (
    Example,
    _Shoppers,
    collate,
    collate_shoppers,
    make_private,
    per_shopper,
    sequence_loss,
    train_model,
)
from fedanom.common.errors import FedanomError
from fedanom.common.settings import ARCHITECTURE_NAMES, BackboneConfig, LoraSettings, TrainSettings
from fedanom.common.tokens import BOS, CONTEXT, CONTEXT_OFFSETS, CONTEXT_WIDTHS, EOS
from fedanom.common.windows import Windows

TINY = BackboneConfig(d_model=32, n_layers=1, n_heads=2, max_events=16, dropout=0.0)
# CUDA joins where a GPU is present (a merchant's GPU path runs the same DP arithmetic); CI has none.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def sequences(n: int, seed: int = 0) -> list[np.ndarray]:
    """Framed windows: <bos>, one random bucket of each context measure, 1-11 random events, <eos>."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        context = [o + rng.integers(w) for o, w in zip(CONTEXT_OFFSETS, CONTEXT_WIDTHS, strict=True)]
        out.append(np.array([BOS, *context, *rng.integers(3, 500, rng.integers(1, 12)), EOS]))
    return out


def toy_windows(n: int, seed: int = 0, sessions_per_user: int = 1) -> Windows:
    framed = sequences(n, seed)
    seqs = [s[1 + len(CONTEXT) : -1] for s in framed]
    lengths = np.array([len(s) for s in seqs])
    events = int(lengths.sum())
    return Windows(
        tokens=np.concatenate(seqs).astype(np.int32),
        ts=np.arange(events, dtype=np.int64),
        gap_ms=np.zeros(events, dtype=np.int64),
        line=np.arange(events, dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        session=np.array([f"s{i}" for i in range(n)], dtype=object),
        user=np.array([f"u{i // sessions_per_user}" for i in range(n)], dtype=object),
        window_index=np.zeros(n, dtype=np.int32),
        closes_session=np.ones(n, dtype=bool),
        start_ms=np.arange(n, dtype=np.int64),
        features=np.zeros((n, 1), dtype=np.float32),
        context=np.array([s[1 : 1 + len(CONTEXT)] for s in framed], dtype=np.int32),
    )


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize(("ffa", "head"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_dp_gradient_is_the_mean_of_per_example_gradients(
    architecture: str, mode: str, ffa: bool, head: bool, device: str
) -> None:
    """With no noise and a clip bound no gradient reaches, DP-SGD's gradient is the plain mean
    (adapter, and the supervised head trained on labels)."""
    config = BackboneConfig(**{**TINY.__dict__, "architecture": architecture})
    model = attach_lora(
        build_backbone(config, seed=1, device=device), LoraSettings(rank=4, ffa=ffa, supervised_head=head)
    )
    # give B non-zero values so every LoRA parameter has a non-trivial gradient
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    labels = [1.0, 0.0, -1.0, 0.0, 1.0, -1.0] if head else [-1.0] * 6
    batch: list[Example] = list(zip(sequences(6, seed=2), labels, strict=True))

    per_example = []
    for seq, label in batch:
        ids, mask = pad_batch([seq], device)
        loss = sequence_loss(model, ids, mask, torch.tensor([label], device=device))
        per_example.append(torch.autograd.grad(loss, params))
    expected = [torch.stack(g).mean(0) for g in zip(*per_example, strict=True)]

    loader: DataLoader[Example] = DataLoader(batch, batch_size=len(batch), collate_fn=collate)  # type: ignore[arg-type]
    settings = TrainSettings(max_grad_norm=1e6, grad_sample_mode=mode)
    dp_model, dp_optimizer, dp_loader = noiseless(model, params, loader, settings)
    ids, mask, known = (t.to(device) for t in next(iter(dp_loader)))
    sequence_loss(dp_model, ids, mask, known).backward()
    dp_optimizer.step()
    assert len(params) == len(expected) > 0
    for p, want in zip(params, expected, strict=True):
        assert p.grad is not None
        error = (p.grad - want).norm() / want.norm()
        assert error <= 1e-5, f"relative error {error:.2e}"


def test_one_dp_step_changes_the_adapter_and_only_b_under_ffa() -> None:
    model = attach_lora(build_backbone(TINY, seed=1), LoraSettings(rank=4, ffa=True))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    before = trainable_state(model)
    assert before and all("lora_B" in n for n in before)
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1e-3)
    model.eval()  # as scoring leaves it: Opacus wants training mode, which training sets
    report = train_model(model, toy_windows(200), TrainSettings(epochs=0.01, batch_size=16), ledger=ledger)
    assert report.steps == 1
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p.detach(), a_before[n])


def test_deployed_noise_is_unpredictable_and_only_a_research_seed_repeats_it() -> None:
    def adapter_after_dp_run(seed: int | None) -> tuple[dict[str, torch.Tensor], str]:
        model = attach_lora(build_backbone(TINY, seed=1), LoraSettings(rank=2))
        ledger = PrivacyLedger(epsilon_budget=8.0, delta=1e-3)
        settings = TrainSettings(epochs=0.2, batch_size=20, seed=seed)
        report = train_model(model, toy_windows(100), settings, ledger=ledger)
        return trainable_state(model), report.noise

    first, second = adapter_after_dp_run(None), adapter_after_dp_run(None)
    assert first[1] == second[1] == "os-entropy"
    assert any(not torch.equal(first[0][n], second[0][n]) for n in first[0])
    seeded, again = adapter_after_dp_run(5), adapter_after_dp_run(5)
    assert seeded[1] == "seeded"
    assert all(torch.equal(seeded[0][n], again[0][n]) for n in seeded[0])


def test_reported_epsilon_is_the_accountants_for_the_steps_taken(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3)
    report = train_model(
        attach_lora(build_backbone(TINY), LoraSettings(rank=2)),
        toy_windows(300),
        TrainSettings(epochs=1.0, batch_size=30),
        ledger=ledger,
    )
    assert report.noise_multiplier is not None and report.epsilon_spent is not None
    independent = RDPAccountant()
    independent.history = [(report.noise_multiplier, 30 / 300, report.steps)]
    assert report.epsilon_spent == pytest.approx(independent.get_epsilon(1e-3), rel=1e-9)
    assert report.epsilon_spent <= 4.0
    reopened = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=0.05)
    assert reopened.delta == 1e-3  # δ is fixed at first use
    assert reopened.spent() == pytest.approx(report.epsilon_spent, rel=1e-12)


def test_the_budget_is_never_exceeded_across_runs(tmp_path: Path) -> None:
    model = attach_lora(build_backbone(TINY), LoraSettings(rank=2))
    windows = toy_windows(100)
    spent = []
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        for _ in range(50):
            ledger = PrivacyLedger.open(tmp_path, epsilon_budget=1.0, delta=1e-3)
            report = train_model(model, windows, TrainSettings(epochs=2.0, batch_size=50), ledger=ledger)
            assert report.epsilon_spent is not None
            spent.append(report.epsilon_spent)
    assert len(spent) >= 1
    assert all(e <= 1.0 for e in spent)
    assert spent == sorted(spent)  # ε only accumulates
    assert PrivacyLedger.open(tmp_path, epsilon_budget=1.0, delta=1e-3).spent() <= 1.0


def test_runs_sharing_a_ledger_cannot_both_spend_the_budget(tmp_path: Path) -> None:
    """Both open the ledger before either trains (two `train` runs on one --state-dir at once): the second
    plans against the first one's reservation, and nothing either spent is lost."""
    first = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3)
    second = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3)
    _, run = first.reserve(0.1, 100)  # planned to spend the whole budget
    with pytest.raises(BudgetExhausted):
        second.reserve(0.1, 100)
    first.settle(run, 100)
    assert PrivacyLedger.spent_in(tmp_path) == pytest.approx(4.0, rel=0.01)
    # half the budget each: both fit, and the ledger holds both runs' steps
    shared = tmp_path / "shared"
    first, second = (PrivacyLedger.open(shared, epsilon_budget=8.0, delta=1e-3) for _ in range(2))
    runs = [first.reserve(0.1, 50, planned_steps=100)[1], second.reserve(0.1, 50, planned_steps=50)[1]]
    first.settle(runs[0], 50)
    second.settle(runs[1], 50)
    ledger = json.loads((shared / LEDGER_FILE).read_text())
    assert sum(steps for _, _, steps in ledger["history"]) == 100 and ledger["reserved"] == {}
    assert PrivacyLedger.spent_in(shared) <= 8.0


def test_a_run_that_dies_before_settling_stays_counted(tmp_path: Path) -> None:
    PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3).reserve(0.1, 100)
    assert PrivacyLedger.spent_in(tmp_path) == pytest.approx(4.0, rel=0.01)
    with pytest.raises(BudgetExhausted):
        PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3).reserve(0.1, 10)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda saved: saved.update(delta=0.99), "'delta' (0.99)"),
        (lambda saved: saved.update(history=[]), "'history'"),
        (lambda saved: saved["history"][0].__setitem__(2, -2074), "history entry 1's steps (-2074)"),
        (lambda saved: saved["history"][0].__setitem__(2, 2.5), "history entry 1's steps (2.5)"),
        (
            lambda saved: saved["history"][0].__setitem__(0, float("nan")),
            "history entry 1's noise multiplier (nan)",
        ),
        (lambda saved: saved["history"][0].__setitem__(0, -1.0), "history entry 1's noise multiplier (-1.0)"),
        (lambda saved: saved["history"][0].__setitem__(1, 3.0), "history entry 1's sampling rate (3.0)"),
        (lambda saved: saved.pop("delta"), "its layout"),
    ],
)
def test_an_implausible_ledger_refuses_training_and_is_left_as_it_was(
    tmp_path: Path, edit: Any, field: str
) -> None:
    """Fails closed: the file and field named, nothing reset, nothing under-counted."""
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3)
    ledger.settle(ledger.reserve(0.1, 10)[1], 10)
    path = tmp_path / LEDGER_FILE
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))
    before = path.read_text()
    for read in (
        lambda: PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-3),
        lambda: PrivacyLedger.spent_in(tmp_path),
    ):
        with pytest.raises(FedanomError, match=re.escape(f"{path}: {field}")):
            read()
    assert path.read_text() == before


def noiseless(
    model: torch.nn.Module, params: list[torch.nn.Parameter], loader: DataLoader[Any], settings: TrainSettings
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader[Any]]:
    """Opacus around the model with no noise and fixed batches: its arithmetic alone, checked exactly."""
    ledger = PrivacyLedger(epsilon_budget=8.0, delta=1e-5, unit=settings.privacy_unit)
    private = make_private(
        model,
        torch.optim.SGD(params, lr=0.0),
        loader,
        settings=settings,
        ledger=ledger,
        noise_multiplier=0.0,
        poisson_sampling=False,
    )
    return private[0], private[1], private[2]


def shoppers_model() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    model = attach_lora(build_backbone(TINY, seed=1), LoraSettings(rank=4))
    with torch.no_grad():  # B non-zero: every adapter value has a non-trivial gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, [p for p in model.parameters() if p.requires_grad]


def test_a_shoppers_dp_gradient_is_the_sum_of_their_windows_gradients() -> None:
    """User-level DP-SGD with no noise and a clip no gradient reaches: each shopper's gradient is the sum
    of their windows' gradients, and the step is the mean over shoppers."""
    model, params = shoppers_model()
    windows = toy_windows(6, seed=3, sessions_per_user=2)  # u0: windows 0-1, u1: 2-3, u2: 4-5
    shoppers = _Shoppers(windows, None, cap=8)
    per_window = []
    for i in range(windows.n_windows):
        ids, mask = pad_batch([windows.framed(i)])
        per_window.append(torch.autograd.grad(sequence_loss(model, ids, mask), params))
    by_shopper = [
        [sum(per_window[i][k] for i in group) for k in range(len(params))] for group in shoppers.groups
    ]
    loader: DataLoader[Any] = DataLoader(shoppers, batch_size=3, collate_fn=collate_shoppers)
    settings = TrainSettings(max_grad_norm=1e6, privacy_unit="user")
    dp_model, dp_optimizer, dp_loader = noiseless(model, params, loader, settings)
    ids, mask, known, owner = next(iter(dp_loader))
    sequence_loss(dp_model, ids, mask, known).backward()
    per_shopper(dp_model, owner, 3)
    for k, p in enumerate(params):
        for u in range(3):
            want = by_shopper[u][k]
            error = (p.grad_sample[u] - want).norm() / want.norm()  # type: ignore[attr-defined]
            assert error <= 1e-5, f"shopper {u}: relative error {error:.2e}"
    dp_optimizer.step()
    for k, p in enumerate(params):
        want = sum(by_shopper[u][k] for u in range(3)) / 3
        assert p.grad is not None and (p.grad - want).norm() / want.norm() <= 1e-5


def test_each_shoppers_contribution_is_clipped_to_the_bound() -> None:
    """One shopper per step, no noise, a small clip: the step's gradient is that shopper's contribution,
    and its norm over every trained value is at most the clip, however many windows the shopper has."""
    model, params = shoppers_model()
    windows = toy_windows(12, seed=4, sessions_per_user=4)
    loader: DataLoader[Any] = DataLoader(
        _Shoppers(windows, None, cap=8), batch_size=1, collate_fn=collate_shoppers
    )
    settings = TrainSettings(max_grad_norm=0.01, privacy_unit="user")
    dp_model, dp_optimizer, dp_loader = noiseless(model, params, loader, settings)
    for ids, mask, known, owner in dp_loader:
        dp_optimizer.zero_grad(set_to_none=True)
        sequence_loss(dp_model, ids, mask, known).backward()
        per_shopper(dp_model, owner, 1)
        dp_optimizer.step()
        norm = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
        assert 0 < norm <= 0.01 * (1 + 1e-4), f"a shopper's contribution has norm {norm:.3g}"


def test_user_level_epsilon_is_the_accountants_for_the_shoppers_sampling_rate(tmp_path: Path) -> None:
    windows = toy_windows(300, sessions_per_user=5)  # 60 shoppers
    ledger = PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-2, unit="user")
    settings = TrainSettings(epochs=1.0, batch_size=10, privacy_unit="user", max_windows_per_user=3)
    report = train_model(
        attach_lora(build_backbone(TINY), LoraSettings(rank=2)), windows, settings, ledger=ledger
    )
    assert report.sample_rate == pytest.approx(10 / 60) and report.steps == settings.steps_for(60) == 6
    assert report.noise_multiplier is not None and report.epsilon_spent is not None
    independent = RDPAccountant()
    independent.history = [(report.noise_multiplier, 10 / 60, report.steps)]
    assert report.epsilon_spent == pytest.approx(independent.get_epsilon(1e-2), rel=1e-9)
    assert report.epsilon_spent <= 4.0
    # ε spent per shopper and ε per session do not add up: the ledger says so instead of mixing them
    with pytest.raises(FedanomError, match="holds ε spent per user, and ε per session cannot be added"):
        PrivacyLedger.open(tmp_path, epsilon_budget=4.0, delta=1e-2, unit="session")
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["unit"] == "user"


def test_a_ledger_written_before_units_counts_sessions_and_never_mixes_with_the_default(
    tmp_path: Path,
) -> None:
    # the layout an earlier version wrote: no unit, its spends per session
    legacy = {"delta": 1e-3, "accountant": "rdp", "history": [[1.0, 0.1, 30]], "reserved": {}}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(legacy))
    assert TrainSettings().privacy_unit == "user"
    with pytest.raises(FedanomError, match="holds ε spent per session, and ε per user cannot be added"):
        PrivacyLedger.open(tmp_path, epsilon_budget=8.0, delta=1e-3)
    kept = PrivacyLedger.open(tmp_path, epsilon_budget=8.0, delta=1e-3, unit="session")
    assert kept.unit == "session" and kept.history == [(1.0, 0.1, 30)]
