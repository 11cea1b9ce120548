"""Epsilon of Poisson-subsampled Gaussian mechanisms (Opacus' accountants), and the noise for one.

Shared by the sites (DP-SGD, patient- or slice-level) and the coordinator (site-level DP):
:func:`epsilon_of` composes a history, :func:`calibrate_noise` is the one place a noise
multiplier is chosen for a target epsilon, :class:`SiteAccountant` is a site's running account.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsynth.common.config import PrivacyConfig

if TYPE_CHECKING:
    from fedsynth.common.privacy.plan import NoisePlan

# Opacus' default orders stop at 63 and start at 1.1; very small or very large epsilons need more.
RDP_ORDERS = [1.01, 1.02, 1.05] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, mechanism: str) -> float:
    """Epsilon at ``delta`` of ``(noise multiplier, sample rate, steps)`` runs, composed."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # only where DP is on (about 1.5 s)

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(float(n), float(q), int(s)) for n, q, s in history]
    if mechanism == "rdp":
        return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(privacy: PrivacyConfig, *, sample_rate: float, steps: int) -> float:
    """``privacy.noise_multiplier``, or the multiplier that reaches ``privacy.target_epsilon`` at
    ``privacy.delta`` after ``steps`` releases, each at Poisson rate ``sample_rate``."""
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    assert privacy.target_epsilon is not None
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            target_delta=privacy.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=privacy.accountant,
            epsilon_tolerance=0.005,
        )
    )


class SiteAccountant:
    """The one privacy accountant of a site: every DP-SGD step of every round, composed.

    Args:
        mechanism: ``"rdp"`` (Mironov 2017; Mironov et al. 2019) or ``"prv"`` (Gopi et al. 2021).
        delta: the delta epsilon is reported at.
    """

    def __init__(self, mechanism: str, delta: float):
        self.mechanism = mechanism
        self.delta = delta
        from opacus.accountants import create_accountant

        self.accountant = create_accountant(mechanism=mechanism)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(effective noise multiplier, sample rate, steps)`` runs, oldest first."""
        return list(self.accountant.history)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.accountant.history)

    def step(self, plan: NoisePlan) -> None:
        """Record one training step (all ``plan.networks`` releases on one Poisson batch)."""
        self.accountant.step(noise_multiplier=plan.effective_noise, sample_rate=plan.sample_rate)

    def epsilon(self, extra_steps: int = 0, plan: NoisePlan | None = None) -> float:
        """Cumulative epsilon at ``delta``; with ``extra_steps`` of ``plan``, the projection."""
        history = self.history
        if extra_steps:
            assert plan is not None
            history.append((plan.effective_noise, plan.sample_rate, extra_steps))
        return epsilon_of(history, self.delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "delta": self.delta,
            "history": [[float(n), float(q), int(s)] for n, q, s in self.accountant.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mechanism"] != self.mechanism:
            raise ValueError(
                f"the site's saved accountant is {state['mechanism']!r}, the run asks for "
                f"{self.mechanism!r}: privacy.accountant cannot change during a run"
            )
        self.accountant.history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]


def patient_epsilon(
    plan: NoisePlan, steps: int, group: int, delta: float, orders: Iterable[float] = RDP_ORDERS
) -> float:
    """Epsilon for a whole patient (``group`` examples), by an RDP group bound.

    At each step the number ``J`` of the patient's examples in the batch is Binomial(k, q) and
    the noisy sum moves by at most ``J * C`` (per network). Writing the output distribution as a
    mixture over ``J >= 1`` of ``(1 - q') N(0) + q' N(mu_J)`` with ``q' = 1 - (1 - q)^k`` and
    using the joint quasi-convexity of Renyi divergence, every order is bounded by the subsampled
    Gaussian with rate ``q'`` and sensitivity ``k C``, i.e. noise multiplier ``sigma_eff / k``.
    Loose for large ``k``: that is the honest price of slice-level DP for a patient.
    """
    if steps == 0:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    q_group = 1.0 - (1.0 - plan.sample_rate) ** group
    orders = list(orders)
    rdp = rdp_analysis.compute_rdp(
        q=q_group, noise_multiplier=plan.effective_noise / group, steps=steps, orders=orders
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)
