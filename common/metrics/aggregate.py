"""All metrics of one prediction at once, and their means over slices, volumes or subjects."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedsynth.common.metrics.checks import check_mask, check_pair, to_unit
from fedsynth.common.metrics.kspace import BAND_NAMES, kspace_band_errors
from fedsynth.common.metrics.lesions import region_values
from fedsynth.common.metrics.pixelwise import (
    mean_absolute_error,
    mean_squared_error,
    psnr_from_mse,
)
from fedsynth.common.metrics.ssim import local_ssim, mean_ssim

logger = logging.getLogger(__name__)


def image_metrics(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    lesion: npt.ArrayLike | None = None,
) -> dict[str, float]:
    """All metrics of one model-scale prediction, a 2D slice or a 3D volume.

    ``pred`` and ``target`` are on the model's [-1, 1] scale; both go through :func:`to_unit`
    and every metric is computed on [0, 1] with ``data_range = 1``.

    Keys, always: ``psnr``, ``ssim``, ``mae``, ``nmse`` (whole image), ``kspace_low``,
    ``kspace_mid``, ``kspace_high`` (per slice along axis 0 for a volume ``(n, H, W)``, averaged).
    With ``mask`` (e.g. the head foreground): ``psnr_masked``, ``ssim_masked``, ``mae_masked``,
    ``nmse_masked``. With ``lesion``: ``lesion_psnr``, ``lesion_ssim``, ``lesion_mae``.

    Undefined values are NaN rather than errors, so one bad slice does not stop an evaluation
    (:func:`mean_metrics` skips them): ``nmse`` when the target is all background (zero after
    :func:`to_unit`), every masked / lesion value when the mask / lesion is empty, the SSIM ones
    when it lies entirely in the SSIM border. ``psnr*`` are ``inf`` for an exact reproduction.

    Raises:
        ValueError: mismatched shapes, not 2D/3D, NaN/inf values, a mask of another shape, or an
            axis shorter than 11 pixels (SSIM's window).
    """
    p_raw, t_raw = check_pair(pred, target)
    p, t = to_unit(p_raw), to_unit(t_raw)
    ssim_values = local_ssim(p, t, 1.0)
    energy = float(np.sum(t * t))
    results: dict[str, float] = {
        "psnr": psnr_from_mse(mean_squared_error(p, t, None), 1.0),
        "ssim": mean_ssim(ssim_values, None),
        "mae": mean_absolute_error(p, t, None),
        "nmse": float(np.sum((p - t) ** 2)) / energy if energy > 0 else math.nan,
    }
    if mask is not None:
        region = check_mask("mask", mask, p.shape)
        values = region_values(p, t, region, 1.0, ssim_values)
        masked_energy = float(np.sum(t[region] ** 2))
        if not region.any():
            logger.debug("image_metrics: empty mask, masked metrics are NaN")
        results |= {f"{key}_masked": value for key, value in values.items()}
        results["nmse_masked"] = (
            float(np.sum((p[region] - t[region]) ** 2)) / masked_energy
            if masked_energy > 0
            else math.nan
        )
    spectrum = kspace_band_errors(p, t)
    results |= {f"kspace_{band}": spectrum[band] for band in BAND_NAMES}
    if lesion is not None:
        region = check_mask("lesion", lesion, p.shape)
        values = region_values(p, t, region, 1.0, ssim_values)
        results |= {f"lesion_{key}": value for key, value in values.items()}
    return results


def mean_metrics(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Average metric dictionaries (one per slice, volume or subject), key by key.

    For every key found in any dictionary (in first-seen order) the result holds three entries:

    * ``key``: the mean of its finite values; NaN values (undefined, e.g. a lesion metric of a
      slice without lesion) and missing keys are skipped; NaN if no finite value is left.
    * ``key + "_n"``: how many finite values went into that mean.
    * ``key + "_n_inf"``: how many infinite values were left out of it (a PSNR of ``inf`` is an
      exact reproduction; averaging it would make the mean ``inf``), reported so they are not
      silently lost.

    The key set depends only on the input keys, so every site reports the same keys.

    Raises:
        ValueError: no dictionaries, or a value that is not a real number.
    """
    rows = list(results)
    if not rows:
        raise ValueError("mean_metrics needs at least one metrics dictionary, got none")
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    summary: dict[str, float] = {}
    for key in keys:
        finite: list[float] = []
        n_inf = 0
        for row in rows:
            if key not in row:
                continue
            try:
                value = float(row[key])
            except (TypeError, ValueError) as error:
                raise ValueError(f"metric {key!r} must be a number, got {row[key]!r}") from error
            if math.isinf(value):
                n_inf += 1
            elif not math.isnan(value):
                finite.append(value)
        summary[key] = math.fsum(finite) / len(finite) if finite else math.nan
        summary[f"{key}_n"] = float(len(finite))
        summary[f"{key}_n_inf"] = float(n_inf)
    return summary
