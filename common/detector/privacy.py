"""Each merchant's privacy budget, accounted across training calls, federated rounds and restarts.

Opacus's RDP accountant is nothing but a history of (noise multiplier, sample rate, steps). The ledger
keeps that history in the merchant's state directory, hands it to every new PrivacyEngine before
training, and saves what the engine added afterwards, so ε accumulates however the training is split.
δ is fixed at first use (by default 1 / the number of training units: shoppers, or sessions) and kept,
since ε spent under different δs does not add up. A run is planned before it starts: its noise is
calibrated so that the history plus its steps stays within the budget, and a run that cannot fit is
refused.

The ledger fails closed. Every value is checked when it is read: a δ or a step that no training could
have recorded (an edit, a corrupt disk) refuses training with the file and the field named, rather than
resetting or under-counting what was spent. Runs that share a state directory cannot lose each other's
spending: under a file lock, a run plans its noise against everything spent or reserved and reserves its
steps before it trains, and settles the steps it took afterwards; a run that dies in between leaves its
reservation counted as spent.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from opacus.accountants import RDPAccountant

from fedanom.common.errors import BudgetExhausted, FedanomError
from fedanom.common.settings import PRIVACY_UNITS, TrainSettings

LEDGER_FILE = "privacy.json"
MAX_NOISE = 50.0  # beyond this a step carries no useful signal: the budget is spent
# Less than this share of the budget left counts as spent: RDP composition would otherwise let ever
# noisier runs squeeze into the sliver a run planned to use the whole budget leaves behind.
EXHAUSTED_SHARE = 0.01
NOISE_TOLERANCE = 1.002  # the noise search stops within 0.2%, so a planned run leaves < 1% unspent
MAX_DELTA = 0.1  # δ is 1 / the training units by default; beyond this it promises nothing
LOCK_TIMEOUT_S = 60.0  # the lock is held only to plan and write, never while training
# (noise multiplier, sample rate, steps), as Opacus's RDP accountant keeps them
Entry = tuple[float, float, int]


@dataclass
class PrivacyLedger:
    epsilon_budget: float
    delta: float
    history: list[Entry] = field(default_factory=list)
    path: Path | None = None  # None: kept in memory only (a one-off local fit)
    reserved: dict[str, Entry] = field(default_factory=dict)  # runs in progress (or that died), by run id
    unit: str = TrainSettings.privacy_unit  # what every spend in it counted as one

    @classmethod
    def open(
        cls,
        state_dir: str | Path | None,
        *,
        epsilon_budget: float,
        delta: float,
        unit: str = TrainSettings.privacy_unit,
    ) -> PrivacyLedger:
        """The ledger in `state_dir` (created on first use), with this call's budget; δ stays as first set,
        and so does the privacy unit: ε spent per session and ε spent per shopper do not add up."""
        if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise FedanomError(f"the privacy budget ε must be a positive number, not {epsilon_budget}")
        if not 0 < delta <= MAX_DELTA:
            raise FedanomError(f"δ must be above 0 and at most {MAX_DELTA}, not {delta}")
        if state_dir is None:
            return cls(epsilon_budget=epsilon_budget, delta=delta, unit=unit)
        path = Path(state_dir) / LEDGER_FILE
        if path.exists():
            delta, spent_unit, history, reserved = _read(path)
            _same_unit(path, spent_unit, unit)
            return cls(epsilon_budget, delta, history, path, reserved, unit)
        return cls(epsilon_budget=epsilon_budget, delta=delta, path=path, unit=unit)

    @classmethod
    def spent_in(cls, state_dir: str | Path) -> float:
        """ε spent so far by the merchant whose state directory this is (0 if it never trained)."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return 0.0
        delta, unit, history, reserved = _read(path)
        return cls(math.inf, delta, history, None, reserved, unit).spent()

    def counted(self) -> list[Entry]:
        """Every step taken or reserved so far, as Opacus's accountant keeps its history."""
        return [*self.history, *self.reserved.values()]

    def spent(self) -> float:
        """ε spent, counting the steps reserved by runs that have not settled."""
        counted = self.counted()
        return epsilon_of(counted, self.delta) if counted else 0.0

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_of([*self.counted(), (noise_multiplier, sample_rate, steps)], self.delta)

    def plan(self, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier (to 0.2%) whose `steps` keep the total within the budget."""
        remaining = self.epsilon_budget - self.spent()
        if remaining < EXHAUSTED_SHARE * self.epsilon_budget or (
            self.epsilon_after(MAX_NOISE, sample_rate, steps) > self.epsilon_budget
        ):
            raise BudgetExhausted(
                f"privacy budget exhausted: ε {self.spent():.3g} of {self.epsilon_budget:g} is spent "
                f"(δ={self.delta:.2g}) and {steps} more steps cannot fit; raise --epsilon or stop training"
            )
        low, high = 0.05, MAX_NOISE
        if self.epsilon_after(low, sample_rate, steps) <= self.epsilon_budget:
            return low
        while high / low > NOISE_TOLERANCE:
            mid = math.sqrt(low * high)
            if self.epsilon_after(mid, sample_rate, steps) > self.epsilon_budget:
                low = mid
            else:
                high = mid
        return high

    def reserve(self, sample_rate: float, steps: int, planned_steps: int = 0) -> tuple[float, str]:
        """Plan a run's noise (for `planned_steps` when a federation plans the rounds still to come) and
        reserve its `steps` in the ledger file, in one locked read-modify-write: (noise, run id)."""
        with self._locked():
            noise = self.plan(sample_rate, max(steps, planned_steps))
            run = uuid.uuid4().hex
            self.reserved[run] = (noise, sample_rate, steps)
            self._write()
        return noise, run

    def settle(self, run: str, steps_taken: int) -> None:
        """Replace a run's reservation with the steps it took."""
        with self._locked():
            if run not in self.reserved:
                raise _untrusted(self.path or Path("the privacy ledger"), f"reservation {run}, now missing,")
            noise, rate, _ = self.reserved.pop(run)
            if steps_taken:
                self.history.append((noise, rate, steps_taken))
            self._write()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the ledger file's lock, with what the file holds now read in."""
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.path.with_name(f"{self.path.name}.lock")).acquire(timeout=LOCK_TIMEOUT_S):
                if self.path.exists():
                    self.delta, unit, self.history, self.reserved = _read(self.path)
                    _same_unit(self.path, unit, self.unit)
                yield
        except Timeout:
            raise FedanomError(
                f"{self.path} stayed locked by another training run for {LOCK_TIMEOUT_S:g} s; try again"
            ) from None

    def _write(self) -> None:
        if self.path is None:
            return
        saved = {
            "delta": self.delta,
            "unit": self.unit,
            "accountant": "rdp",
            "history": self.history,
            "reserved": self.reserved,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(self.path)


def epsilon_of(history: list[Entry], delta: float) -> float:
    """ε of an accountant history at δ: Opacus's RDP accountant, as every ledger counts."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # extreme noise levels put the optimal RDP order at the edge
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return accountant.get_epsilon(delta)


def _read(path: Path) -> tuple[float, str, list[Entry], dict[str, Entry]]:
    """(δ, privacy unit, accountant history, reservations) from a ledger file, every value checked (a
    ledger written before units were recorded counted sessions)."""
    try:
        saved = json.loads(path.read_text())
        delta, history = saved["delta"], [(s, q, n) for s, q, n in saved["history"]]
        unit = saved.get("unit", "session")
        reserved = {str(run): (s, q, n) for run, (s, q, n) in saved.get("reserved", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _untrusted(path, "its layout") from None
    if saved.get("accountant") != "rdp":
        raise _untrusted(path, "'accountant'")
    if unit not in PRIVACY_UNITS:
        raise _untrusted(path, f"'unit' ({unit!r})")
    if not (_is_number(delta) and 0 < delta <= MAX_DELTA):
        raise _untrusted(path, f"'delta' ({delta!r})")
    if not history and not reserved:
        raise _untrusted(path, "'history', which is empty though a ledger is only written by training")
    entries = [(f"history entry {i}", e) for i, e in enumerate(history, 1)]
    entries += [(f"reservation {run}", e) for run, e in reserved.items()]
    for name, (sigma, rate, steps) in entries:
        if not (_is_number(sigma) and 0 < sigma <= MAX_NOISE):
            raise _untrusted(path, f"{name}'s noise multiplier ({sigma!r})")
        if not (_is_number(rate) and 0 < rate <= 1):
            raise _untrusted(path, f"{name}'s sampling rate ({rate!r})")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise _untrusted(path, f"{name}'s steps ({steps!r})")
    return (
        float(delta),
        unit,
        [(float(s), float(q), int(n)) for s, q, n in history],
        {run: (float(s), float(q), int(n)) for run, (s, q, n) in reserved.items()},
    )


class UnitMismatch(FedanomError):
    """The ledger counts ε in one privacy unit and a run asks to spend it in another."""


def _same_unit(path: Path, spent: str, asked: str) -> None:
    if spent != asked:
        raise UnitMismatch(
            f"{path} holds ε spent per {spent}, and ε per {asked} cannot be added to it: train with "
            f"--privacy-unit {spent} (in a federation, the operator's server sets the unit)"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _untrusted(path: Path, field: str) -> FedanomError:
    return FedanomError(
        f"{path}: {field} is not what training records, so the privacy spent cannot be trusted and "
        "training is refused; a privacy ledger must not be edited by hand"
    )
