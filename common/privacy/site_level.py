"""Site-level DP at a site: its round's update clipped before it leaves (the coordinator adds
the noise, :mod:`fedsynth.server.strategy`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Site-level DP: scale a round's update (trained - received) to L2 norm <= ``clip_norm``."""
    norm = math.sqrt(
        sum(float((v.double() ** 2).sum()) for v in update.values() if v.is_floating_point())
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    logger.info(
        "site-level DP: update norm %.4g, clipped to %g (scale %.4g)", norm, clip_norm, scale
    )
    return {k: (v * scale if v.is_floating_point() else v) for k, v in update.items()}
