"""PSNR, SSIM and MAE inside a region such as a lesion mask, NaN where the region is empty."""

from __future__ import annotations

import numpy.typing as npt

from fedsynth.common.metrics.checks import (
    BoolArray,
    FloatArray,
    check_data_range,
    check_mask,
    check_pair,
)
from fedsynth.common.metrics.pixelwise import (
    mean_absolute_error,
    mean_squared_error,
    psnr_from_mse,
)
from fedsynth.common.metrics.ssim import local_ssim, mean_ssim

_NO_REGION = float("nan")


def region_values(
    pred: FloatArray,
    target: FloatArray,
    region: BoolArray,
    data_range: float,
    ssim_values: FloatArray | None,
) -> dict[str, float]:
    """PSNR, SSIM, MAE of checked images in ``region``, reusing ``ssim_values`` when given."""
    if not region.any():
        return {"psnr": _NO_REGION, "ssim": _NO_REGION, "mae": _NO_REGION}
    if ssim_values is None:
        ssim_values = local_ssim(pred, target, data_range)
    return {
        "psnr": psnr_from_mse(mean_squared_error(pred, target, region), data_range),
        "ssim": mean_ssim(ssim_values, region),
        "mae": mean_absolute_error(pred, target, region),
    }


def region_metrics(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    region_mask: npt.ArrayLike,
    data_range: float = 1.0,
) -> dict[str, float]:
    """PSNR, SSIM and MAE inside a region such as a lesion mask (the survey's Challenge 2).

    Same definitions as :func:`psnr`, :func:`ssim` (masked: the SSIM map averaged over the
    region's pixels outside the 5-pixel border) and :func:`mae`, restricted to the region.

    Never raises for an empty region: a slice without lesion is normal, so every value is NaN
    when the region is empty (there is nothing to measure), and ``"ssim"`` is NaN when all region
    pixels lie in the SSIM border. :func:`mean_metrics` skips NaN. ``"psnr"`` is ``inf`` when the
    region is reproduced exactly. Invalid inputs (shapes, NaN) still raise ``ValueError``.

    Returns:
        ``{"psnr": ..., "ssim": ..., "mae": ...}``.
    """
    p, t = check_pair(pred, target)
    region = check_mask("region_mask", region_mask, p.shape)
    return region_values(p, t, region, check_data_range(data_range), None)
