"""Misalignment augmentation: a random 2D affine applied to domain B slices only.

Real unpaired data is misaligned by nature; this adds controlled misalignment so that methods
such as RegGAN's registration-corrected loss can be studied at known severities. Ranges are
uniform and symmetric; translation is a fraction of the slice size, scale a relative change:

| severity | rotation | translation | scale |
|---|---|---|---|
| none     | 0 deg    | 0 %         | 0 %   |
| slight   | +-2 deg  | +-2 %       | +-2 % |
| moderate | +-5 deg  | +-5 %       | +-5 % |
| severe   | +-10 deg | +-10 %      | +-10 % |

(The moderate and severe levels bracket the RegGAN paper's noise levels NC.3 to NC.5.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Severity:
    rotation_deg: float
    translation_frac: float
    scale_frac: float


SEVERITIES: dict[str, Severity] = {
    "none": Severity(0.0, 0.0, 0.0),
    "slight": Severity(2.0, 0.02, 0.02),
    "moderate": Severity(5.0, 0.05, 0.05),
    "severe": Severity(10.0, 0.10, 0.10),
}


@dataclass(frozen=True)
class AffineDraw:
    """One drawn transform (radians, pixels, scale factors)."""

    rotation: float
    translation: tuple[float, float]
    scale: tuple[float, float]


def draw_affine(severity: str, size: int, rng: np.random.Generator) -> AffineDraw:
    """Draw one transform of the named severity for a ``size`` x ``size`` slice."""
    if severity not in SEVERITIES:
        raise ValueError(f"unknown misalignment {severity!r}; allowed: {', '.join(SEVERITIES)}")
    level = SEVERITIES[severity]
    rotation = math.radians(rng.uniform(-level.rotation_deg, level.rotation_deg))
    shift = rng.uniform(-level.translation_frac, level.translation_frac, size=2) * size
    scale = 1.0 + rng.uniform(-level.scale_frac, level.scale_frac, size=2)
    return AffineDraw(
        rotation, (float(shift[0]), float(shift[1])), (float(scale[0]), float(scale[1]))
    )


def apply_affine(
    image: np.ndarray, draw: AffineDraw, *, background: float = -1.0, mode: str = "bilinear"
) -> np.ndarray:
    """Warp a (H, W) slice; pixels coming from outside the slice get ``background``."""
    if draw.rotation == 0.0 and draw.translation == (0.0, 0.0) and draw.scale == (1.0, 1.0):
        return image
    from monai.transforms import Affine  # MONAI's import is heavy: only when a slice is warped

    transform = Affine(
        rotate_params=draw.rotation,
        translate_params=draw.translation,
        scale_params=draw.scale,
        padding_mode="zeros",
        mode=mode,
        image_only=True,
    )
    # Shift so that the background is 0 for the zero padding, then shift back.
    shifted = torch.from_numpy(np.asarray(image, dtype=np.float32) - background)[None]
    warped = transform(shifted)
    return np.asarray(warped[0], dtype=np.float32) + background
