"""Intensity-only baseline: histogram matching of the source image to the target's distribution.

The reference every learned model must beat. A monotone map sends each foreground intensity of
the source to the target-domain intensity at the same quantile; it can change brightness and
contrast but never reorder tissues, so it cannot turn dark CSF (T1w) into bright CSF (T2w).
The target distribution comes from the training target-domain slices (never the test target).
"""

from __future__ import annotations

import numpy as np


class HistogramMatcher:
    """Quantile mapping fitted on reference (target-domain) foreground values.

    Args:
        reference: target-domain intensities (any shape; only finite values are used).
        quantiles: number of quantile knots of the piecewise-linear map.
    """

    def __init__(self, reference: np.ndarray, quantiles: int = 256):
        values = np.asarray(reference, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("the reference distribution is empty")
        self.levels = np.linspace(0.0, 1.0, quantiles)
        self.reference = np.quantile(values, self.levels)

    def __call__(
        self, source: np.ndarray, mask: np.ndarray | None = None, background: float = -1.0
    ) -> np.ndarray:
        """Map ``source`` (quantiles over its ``mask``); outside the mask -> ``background``."""
        source = np.asarray(source, dtype=np.float64)
        inside = np.ones(source.shape, bool) if mask is None else np.asarray(mask, bool)
        out = np.full(source.shape, background, dtype=np.float32)
        if not inside.any():
            return out
        knots = np.quantile(source[inside], self.levels)
        # Strictly increasing knots for interpolation (flat stretches share a level).
        knots, unique = np.unique(knots, return_index=True)
        out[inside] = np.interp(source[inside], knots, self.reference[unique]).astype(np.float32)
        return out
