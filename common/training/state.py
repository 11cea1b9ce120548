"""Saving and restoring a trainer's whole local state: networks, optimisers, counters and RNGs.

The state is plain tensors and Python values, so it loads with ``torch.load(weights_only=True)``.
Under DP-SGD it also carries the noise plan and the site accountant's history.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedsynth.common.io import atomic_save

if TYPE_CHECKING:
    from fedsynth.common.privacy.plan import NoisePlan
    from fedsynth.common.training.trainer import CycleGANTrainer


def trainer_state(trainer: CycleGANTrainer) -> dict[str, Any]:
    """The whole local state: networks, optimisers, schedules, pools, counters and RNGs."""
    return {
        "nets": {name: plain_state(net) for name, net in trainer.nets.items()},
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in trainer.schedulers.items()},
        "pools": {name: pool.state_dict() for name, pool in trainer.pools.items()},
        "step": trainer.step,
        "epoch": trainer.epoch,
        **(
            {
                "privacy": {
                    "plan": trainer.plan.to_dict(),
                    "accountant": trainer.accountant.state_dict(),
                }
            }
            if trainer.plan is not None and trainer.accountant is not None
            else {}
        ),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
        },
    }


def saved_plan(state: Mapping[str, Any] | None) -> NoisePlan | None:
    """The noise plan a saved state was trained under, if it was private."""
    from fedsynth.common.privacy.plan import NoisePlan

    if state is None or "privacy" not in state:
        return None
    return NoisePlan.from_dict(state["privacy"]["plan"])


def load_trainer_state(trainer: CycleGANTrainer, state: Mapping[str, Any]) -> None:
    """Restore what :func:`trainer_state` returned (networks must have the same architecture).

    Under DP the trainer must already be private: the accountant's history is restored too.
    """
    if set(state["nets"]) != set(trainer.nets):
        raise ValueError(
            f"saved state holds networks {sorted(state['nets'])}, this trainer has "
            f"{sorted(trainer.nets)} (registration on in one and off in the other?)"
        )
    for name, net in trainer.nets.items():
        unwrap(net).load_state_dict(state["nets"][name])
        trainer.optimizers[name].load_state_dict(state["optimizers"][name])
        trainer.schedulers[name].load_state_dict(state["schedulers"][name])
    for name, pool in trainer.pools.items():
        pool.load_state_dict(state["pools"][name], trainer.device)
        if trainer.privacy is not None:  # the pool stays off under DP, whatever was saved
            pool.size, pool.images = 0, []
    saved_privacy = state.get("privacy")
    if trainer.accountant is not None:
        if saved_privacy is None:
            if int(state["step"]) > 0:
                raise ValueError(
                    "the saved state was trained without differential privacy; a private "
                    "run cannot continue it (its earlier steps have no privacy guarantee)"
                )
        else:
            trainer.accountant.load_state_dict(saved_privacy["accountant"])
    trainer.step = int(state["step"])
    trainer.epoch = int(state["epoch"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    _set_numpy_state(rng["numpy"])
    random.setstate(as_random_state(rng["python"]))


def save_trainer_state(trainer: CycleGANTrainer, path: Path) -> None:
    """Write :func:`trainer_state` atomically (readable with ``weights_only=True``)."""
    atomic_save(path, lambda tmp: torch.save(trainer.state_dict(), tmp))


def load_trainer_file(trainer: CycleGANTrainer, path: Path) -> None:
    """Read a file written by :func:`save_trainer_state`; never unpickles arbitrary objects."""
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    trainer.load_state_dict(state)


def as_random_state(value: Any) -> tuple[Any, ...]:
    """``random.Random.getstate()`` survives torch.save as nested tuples/lists; restore tuples."""
    version, internal, gauss = value
    return (int(version), tuple(int(v) for v in internal), gauss)


def _numpy_state() -> dict[str, Any]:
    """NumPy's global RNG state as plain Python values (safe for ``weights_only`` loading)."""
    # The global legacy RNG is what third-party code (MONAI transforms) draws from: save it too.
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "name": name,
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    np.random.set_state(  # noqa: NPY002
        (
            str(state["name"]),
            np.asarray(state["key"], dtype=np.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached"]),
        )
    )


def unwrap(net: nn.Module) -> nn.Module:
    """The wrapped module of an Opacus GradSampleModule, else the module itself."""
    inner = getattr(net, "_module", None)
    return inner if isinstance(inner, nn.Module) else net


def plain_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A network's weights and buffers, unwrapped, detached and copied to the CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}
