"""How the coordinator combines the sites' networks into the next global model.

Every rule works on flat float32 state dicts (``"g_ab.<param>" -> tensor``), accumulates in
float64 and returns float32, and sees updates in a fixed order (sorted by site name), so a round
gives the same result however the replies arrived. Integer buffers (counters) are not averaged:
the largest value wins.

* ``fedavg``: mean weighted by each site's number of training examples (McMahan et al. 2017).
* ``fedprox``: the same server rule; the proximal term lives in the sites' loss (Li et al. 2020).
* ``fedadam`` / ``fedyogi``: adaptive server optimisers on the pseudo-gradient (weighted mean minus
  the global model), without bias correction, as in Reddi et al. 2021; their moments are part of
  :meth:`Aggregator.state_dict` so a resumed run continues exactly.
* ``fedmedian``: coordinate-wise median (mean of the two middle values for an even count).
* ``fedtrimmedavg``: coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest.

With ``privacy.level = "site"`` the rule is wrapped in :class:`SiteLevelDP` (DP-FedAvg, McMahan et
al. 2018): every update clipped to a fixed norm, an unweighted mean, Gaussian noise on it, and a
coordinator-side accountant; FedAdam/FedYogi then step on the noisy mean (post-processing).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsynth.common.config import FederationConfig, PrivacyConfig
from fedsynth.common.privacy.accounting import calibrate_noise, epsilon_of

logger = logging.getLogger("fedsynth.server")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteUpdate:
    """One accepted update: the site's networks and how many training examples produced them."""

    site: str
    state: Mapping[str, torch.Tensor]
    num_examples: int


def _ordered(updates: Sequence[SiteUpdate]) -> list[SiteUpdate]:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return sorted(updates, key=lambda u: u.site)


def _stack(updates: Sequence[SiteUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.state[key].to(torch.float64) for u in updates])


def weighted_mean(updates: Sequence[SiteUpdate], global_state: Mapping[str, torch.Tensor]) -> State:
    """Example-weighted mean of the floating entries; integer entries take the largest value."""
    ordered = _ordered(updates)
    weights = torch.tensor([float(u.num_examples) for u in ordered], dtype=torch.float64)
    if not bool((weights > 0).all()):
        raise ValueError("every update needs a positive number of examples")
    weights = weights / weights.sum()
    out: State = {}
    for key, reference in global_state.items():
        if reference.is_floating_point():
            stacked = _stack(ordered, key)
            shape = (-1,) + (1,) * (stacked.dim() - 1)
            out[key] = (stacked * weights.view(shape)).sum(0).to(reference.dtype)
        else:
            out[key] = torch.stack([u.state[key] for u in ordered]).amax(0)
    return out


class Aggregator:
    """A stateless rule; subclasses with server-side state override the state methods."""

    name = "fedavg"

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate]
    ) -> State:
        return weighted_mean(updates, global_state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)}")


class FedProx(Aggregator):
    name = "fedprox"


class _Coordinatewise(Aggregator):
    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate]
    ) -> State:
        ordered = _ordered(updates)
        out: State = {}
        for key, reference in global_state.items():
            if reference.is_floating_point():
                out[key] = self._combine(_stack(ordered, key)).to(reference.dtype)
            else:
                out[key] = torch.stack([u.state[key] for u in ordered]).amax(0)
        return out


class FedMedian(_Coordinatewise):
    name = "fedmedian"

    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        values = stacked.sort(dim=0).values
        n = values.shape[0]
        return (values[(n - 1) // 2] + values[n // 2]) / 2


class FedTrimmedAvg(_Coordinatewise):
    name = "fedtrimmedavg"

    def __init__(self, trim_fraction: float):
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.shape[0]
        cut = math.floor(self.trim_fraction * n)
        values = stacked.sort(dim=0).values
        return values[cut : n - cut].mean(0)


class _ServerOptimizer(Aggregator):
    """FedOpt: treat (weighted mean - global) as a gradient step and apply an adaptive update."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate]
    ) -> State:
        mean = weighted_mean(updates, global_state)
        out: State = {}
        for key, reference in global_state.items():
            if not reference.is_floating_point():
                out[key] = mean[key]
                continue
            delta = mean[key].to(torch.float64) - reference.to(torch.float64)
            m = self.m.get(key, torch.zeros_like(delta))
            v = self.v.get(key, torch.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self._second_moment(v, delta)
            self.m[key], self.v[key] = m, v
            step = self.lr * m / (v.sqrt() + self.tau)
            out[key] = (reference.to(torch.float64) + step).to(reference.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k: v.to(torch.float64) for k, v in state.get("m", {}).items()}
        self.v = {k: v.to(torch.float64) for k, v in state.get("v", {}).items()}


class FedAdam(_ServerOptimizer):
    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class FedYogi(_ServerOptimizer):
    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta**2
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)


def update_norm(
    state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> float:
    """L2 norm of ``state - global_state`` over the floating entries, in float64."""
    total = 0.0
    for key, reference in global_state.items():
        if reference.is_floating_point():
            delta = state[key].to(torch.float64) - reference.to(torch.float64)
            total += float((delta**2).sum())
    return math.sqrt(total)


class SiteLevelDP(Aggregator):
    """Client-level DP around a mean-based rule: clip, unweighted mean, Gaussian noise, account.

    Each site clips its round update to ``clip_norm`` before sending (and the coordinator clips
    again, so one site that does not cannot break the guarantee). The sum of the ``n`` clipped
    updates changes by at most ``clip_norm`` when one site joins or leaves, so Gaussian noise of
    std ``noise_multiplier * clip_norm`` on the sum, divided by ``n``, is a Gaussian mechanism per
    round; ``sample_rate`` is the fraction of online sites the round samples. Weights are uniform
    on purpose: example-weighting would let a large site move the mean by more than the bound.

    Args:
        inner: the rule applied to the noisy mean (FedAvg/FedProx keep it; FedAdam/FedYogi step
            on it).
        noise_multiplier: noise std over ``clip_norm``.
        clip_norm: bound on each site's update norm.
        mechanism: ``"rdp"`` or ``"prv"``.
        delta: the delta epsilon is reported at.
    """

    name = "site-level-dp"

    def __init__(
        self,
        inner: Aggregator,
        *,
        noise_multiplier: float,
        clip_norm: float,
        mechanism: str,
        delta: float,
        seed: int | None = None,
    ):
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.mechanism = mechanism
        self.delta = delta
        from opacus.accountants import create_accountant  # only with site-level DP (1.5 s)

        self.accountant = create_accountant(mechanism=mechanism)
        # The noise must be unpredictable to the sites: a fresh secret seed per run, whose
        # generator state is saved with the server state so a resumed run continues exactly.
        self.generator = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else seed
        )
        # No amplification by sampling is claimed: the coordinator's site sampling is seeded
        # (reproducible) and a site knows whether it was asked.
        self.sample_rate = 1.0

    def clip(self, update: SiteUpdate, global_state: Mapping[str, torch.Tensor]) -> SiteUpdate:
        norm = update_norm(update.state, global_state)
        if norm <= self.clip_norm * (1 + 1e-6):
            return update
        logger.warning(
            "%s sent an update of norm %.4g above privacy.site_clip_norm = %g: clipped here",
            update.site,
            norm,
            self.clip_norm,
        )
        scale = self.clip_norm / norm
        state = {
            key: (
                reference.to(torch.float64)
                + scale * (update.state[key].to(torch.float64) - reference.to(torch.float64))
            ).to(reference.dtype)
            if reference.is_floating_point()
            else update.state[key]
            for key, reference in global_state.items()
        }
        return SiteUpdate(update.site, state, update.num_examples)

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate]
    ) -> State:
        ordered = [self.clip(u, global_state) for u in _ordered(updates)]
        n = len(ordered)
        std = self.noise_multiplier * self.clip_norm / n
        noisy: State = {}
        for key, reference in global_state.items():
            if not reference.is_floating_point():
                noisy[key] = torch.stack([u.state[key] for u in ordered]).amax(0)
                continue
            mean = _stack(ordered, key).mean(0)
            noise = torch.normal(
                0.0, std, size=reference.shape, generator=self.generator, dtype=torch.float64
            )
            noisy[key] = (mean + noise).to(reference.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.inner.aggregate(global_state, [SiteUpdate("noisy-mean", noisy, 1)])

    def epsilon(self) -> float:
        """Cumulative site-level epsilon at ``delta`` over the rounds aggregated so far."""
        return epsilon_of(self.accountant.history, self.delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "history": [[float(n), float(q), int(k)] for n, q, k in self.accountant.history],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.accountant.history = [(float(n), float(q), int(k)) for n, q, k in state["history"]]
        self.generator.set_state(state["generator"])


def site_level_noise(privacy: PrivacyConfig, *, sample_rate: float, rounds: int) -> float:
    """``privacy.noise_multiplier``, or the one that reaches ``target_epsilon`` after ``rounds``."""
    sigma = calibrate_noise(privacy, sample_rate=sample_rate, steps=rounds)
    if privacy.noise_multiplier is None:
        logger.info(
            "site-level DP: noise multiplier %.4f for epsilon %g at delta %g over %d rounds",
            sigma,
            privacy.target_epsilon,
            privacy.delta,
            rounds,
        )
    return sigma


def make_aggregator(config: FederationConfig, privacy: PrivacyConfig | None = None) -> Aggregator:
    """The rule ``federation.strategy`` names; wrapped in :class:`SiteLevelDP` at site level."""
    inner = _rule(config)
    if privacy is None or not privacy.site_level:
        return inner
    return SiteLevelDP(
        inner,
        noise_multiplier=site_level_noise(privacy, sample_rate=1.0, rounds=config.rounds),
        clip_norm=privacy.site_clip_norm,
        mechanism=privacy.accountant,
        delta=privacy.delta,
    )


def _rule(config: FederationConfig) -> Aggregator:
    name = config.strategy
    if name == "fedavg":
        return Aggregator()
    if name == "fedprox":
        return FedProx()
    if name == "fedmedian":
        return FedMedian()
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(config.trim_fraction)
    optimizer = FedAdam if name == "fedadam" else FedYogi
    return optimizer(config.server_lr, config.server_beta1, config.server_beta2, config.server_tau)
