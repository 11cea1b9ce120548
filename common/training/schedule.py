"""The learning-rate schedule of CycleGAN (Zhu et al. 2017), for epochs and for rounds alike.

A local run decays over its last ``training.decay_epochs`` epochs; a federation over its last
``federation.decay_rounds`` rounds
(:meth:`~fedsynth.common.config.FederationConfig.round_lr_factor`), with the same rule.
"""

from __future__ import annotations

from collections.abc import Callable


def linear_decay(total_epochs: int, decay_epochs: int) -> Callable[[int], float]:
    """Learning-rate factor per epoch: 1 for the first epochs, then linearly down towards 0.

    As in Zhu et al.: constant for ``total - decay`` epochs, then ``1 - (e - start + 1) / (decay
    + 1)`` so the last epoch still learns a little.
    """
    start = total_epochs - decay_epochs

    def factor(epoch: int) -> float:
        if decay_epochs == 0 or epoch < start:
            return 1.0
        return max(0.0, 1.0 - (epoch - start + 1) / (decay_epochs + 1))

    return factor
