"""The operator's privacy policy for a federation, and the accountant summary a merchant answers it with.

The operator states the terms once (`fedanom server --require-dp --max-epsilon E [--max-delta D]`); they
travel in every round's config. A merchant checks them before it trains: one whose budget or δ does not
conform refuses the round with a fixed code (POLICY_REFUSED), and says why in one sentence in its own
log. Every train reply carries the merchant's accountant summary (`records.ACCOUNTANT_METRICS`); the
server checks it against the same terms before averaging (`server.replies`) and logs it per merchant per
round in `rounds.jsonl`, so a merchant that claims to conform and does not is left out, with its reason.

Torch- and Flower-free where the command line and the ClientApp read it; only the server's check of a
summary's ε loads Opacus's accountant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from fedanom.common.errors import FedanomError
from fedanom.common.settings import RUN_DEFAULTS

# Relative slack on the ε floor: a merchant of another Opacus version may count with other RDP orders and
# round differently; the floor is there to catch a summary that understates ε, not a last digit
EPSILON_TOLERANCE = 0.01


class PolicyRefused(FedanomError):
    """A merchant's privacy terms do not meet the federation's policy: it does not train."""


@dataclass(frozen=True)
class PrivacyPolicy:
    require_dp: bool = False
    max_epsilon: float = 0.0  # 0: no bound beyond DP itself
    max_delta: float = 0.0  # 0: no bound
    privacy_unit: str = ""  # what DP must count as one (the federation's privacy-unit); "": not a term

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> PrivacyPolicy:
        from fedanom.common.records import flag, number  # Flower's: not loaded where the command line starts

        keys = ("require-dp", "max-epsilon", "max-delta", "privacy-unit")
        terms = {key: config.get(key, RUN_DEFAULTS[key]) for key in keys}
        require_dp = flag(terms, "require-dp")
        policy = cls(  # a server of an earlier version states none: no policy
            require_dp=require_dp,
            max_epsilon=number(terms, "max-epsilon"),
            max_delta=number(terms, "max-delta"),
            privacy_unit=str(terms["privacy-unit"]) if require_dp else "",
        )
        if not (0 <= policy.max_epsilon < math.inf and 0 <= policy.max_delta < 1):  # NaN fails too
            raise FedanomError(f"the privacy policy {asdict(policy)} is not one: bounds must be ≥ 0, δ < 1")
        if (policy.max_epsilon or policy.max_delta) and not policy.require_dp:
            raise FedanomError("a bound on ε or δ needs the policy to require DP (--require-dp)")
        return policy

    def refusal(self, *, dp: bool, epsilon_budget: float, delta: float | None) -> str | None:
        """Why a merchant with these terms may not train under this policy (None: it may)."""
        if not self.require_dp:
            return None
        if not dp:
            return "the federation requires DP and this run trains without it"
        if self.max_epsilon and epsilon_budget > self.max_epsilon:
            return (
                f"this merchant's privacy budget ε={epsilon_budget:g} is above the federation's maximum "
                f"ε={self.max_epsilon:g}: join with --epsilon {self.max_epsilon:g} or less"
            )
        return self._delta_refusal(delta)

    def violation(self, metrics: Mapping[str, float]) -> str | None:
        """Why a train reply's accountant summary breaks this policy (None: it conforms)."""
        if not self.require_dp:
            return None
        if metrics["noise-multiplier"] <= 0:
            return "its accountant reports no DP noise, and the federation requires DP"
        user_level = bool(metrics.get("user-level", 0.0))  # an earlier version counted sessions
        if self.privacy_unit and user_level != (self.privacy_unit == "user"):
            counted = "a shopper" if user_level else "a session"
            unit = self.privacy_unit
            return f"its accountant counted {counted} as the unit, and the federation's policy is per {unit}"
        understated = _understated(metrics)
        if understated:
            return understated
        spent = max(metrics["epsilon"], metrics["epsilon-budget"])
        if self.max_epsilon and spent > self.max_epsilon:
            return (
                f"its accountant reports ε={spent:.4g}, above the federation's maximum ε={self.max_epsilon:g}"
            )
        return self._delta_refusal(metrics["delta"])

    def _delta_refusal(self, delta: float | None) -> str | None:
        if self.max_delta and delta is not None and delta > self.max_delta:
            return f"this merchant's δ={delta:.3g} is above the federation's maximum δ={self.max_delta:.3g}"
        return None


def _understated(metrics: Mapping[str, float]) -> str | None:
    """Why a summary's ε cannot be true: less than this round's own noise, sampling rate and steps spend
    at its δ (as every ledger counts them; ε over all rounds is never less than one round's), so a
    merchant cannot claim a smaller ε than its own noise gives."""
    from fedanom.common.detector.privacy import MAX_NOISE, epsilon_of  # torch: the server's check only

    sigma, rate, steps = metrics["noise-multiplier"], metrics["sample-rate"], metrics["steps"]
    if sigma > MAX_NOISE:  # no ledger plans more (and Opacus's analysis would take unbounded time)
        return f"its accountant reports a noise multiplier of {sigma:.4g}, more than a ledger plans"
    if rate == 0 or steps < 1:  # a DP round takes at least one step at a positive rate
        return "its accountant reports no training step this round"
    try:
        floor = epsilon_of([(sigma, rate, int(steps))], metrics["delta"])
    except (ArithmeticError, ValueError):  # an absurd δ or rate
        floor = math.inf
    if metrics["epsilon"] >= floor * (1 - EPSILON_TOLERANCE):
        return None
    return (
        f"its accountant reports ε={metrics['epsilon']:.4g}, less than this round's own noise, sampling "
        f"rate and steps spend (ε={floor:.4g})"
    )
