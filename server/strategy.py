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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.config import FederationConfig

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


def make_aggregator(config: FederationConfig) -> Aggregator:
    """The rule ``federation.strategy`` names, with its settings from the same section."""
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
