"""DP-SGD through Opacus: every private network a ``GradSampleModule``, its optimiser a
``DPOptimizer`` without an accounting hook (the site's accountant records one joint step)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedsynth.common.config import PrivacyConfig
from fedsynth.common.privacy.grad_samplers import install_grad_samplers
from fedsynth.common.privacy.plan import NoisePlan

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

# Opacus is imported where DP needs it, not with this module: it costs about 1.5 s of CPU per
# import, and a site without DP (or the coordinator reading a budget) should not pay for it in
# every ClientApp process.


def make_private(
    nets: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    privacy: PrivacyConfig,
    plan: NoisePlan,
    batch_size: int,
) -> tuple[dict[str, nn.Module], dict[str, DPOptimizer]]:
    """Wrap every network in a ``GradSampleModule`` and its optimiser in a ``DPOptimizer``.

    The optimisers get no accountant hook:
    :class:`~fedsynth.common.privacy.accounting.SiteAccountant` records one joint step per training
    step instead (see :mod:`fedsynth.common.privacy`). Noise comes from torch's global generator, so
    it is part of the trainer's saved RNG state (resume stays bit-exact).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    install_grad_samplers()
    # Opacus' full backward hooks fire on the first layer, whose input needs no gradient: benign.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
    wrapped_nets: dict[str, nn.Module] = {}
    wrapped_opts: dict[str, DPOptimizer] = {}
    for name, net in nets.items():
        module = (
            net
            if isinstance(net, GradSampleModule)
            else GradSampleModule(
                net,
                batch_first=True,
                loss_reduction="mean",
                strict=True,
                force_functorch=privacy.grad_sample_mode == "functorch",
            )
        )
        wrapped_nets[name] = module
        optimizer = optimizers[name]
        inner = optimizer.original_optimizer if isinstance(optimizer, DPOptimizer) else optimizer
        wrapped_opts[name] = DPOptimizer(
            inner,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
    return wrapped_nets, wrapped_opts


def mark_empty_batch(optimizer: DPOptimizer) -> None:
    """Give every parameter an empty per-sample gradient: an empty Poisson batch still noises.

    Skipping the step would reveal that no example was drawn; the mechanism instead releases
    pure noise, as the analysis assumes.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
