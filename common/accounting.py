"""Epsilon from a history of Poisson-subsampled Gaussian mechanisms (Opacus' accountants).

Shared by the sites (DP-SGD, patient- or slice-level) and the coordinator (site-level DP),
which must not import each other's code.
"""

from __future__ import annotations

from collections.abc import Sequence

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
