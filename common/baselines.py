"""Naive baselines every learned model must stand beside, fitted from mergeable site statistics.

Three predictors need no learning; each maps source slices to the target domain inside the
evaluation mask and writes the background (-1) outside it:

* :class:`ConstantBaseline`: the training sites' mean target intensity, everywhere in the mask;
* :class:`HistogramMatcher`: a monotone map sending each source intensity to the target-domain
  intensity at the same quantile (source quantiles over the slices of one call, e.g. one
  subject; target quantiles from the training sites). It can change brightness and contrast but
  never reorder tissues, so it cannot turn dark CSF (T1w) into bright CSF (T2w);
* :class:`LookupTableBaseline`: per source-intensity bin, the mean target intensity of the
  training sites' co-registered pairs. On real scans this table beats every learned model we
  have trained so far (DESIGN.md, data flow step 4): it is the baseline to beat.

All three are fitted from :class:`IntensityStats`, which a site computes from its own data
(:func:`site_statistics`) and which add up: a coordinator sums the sites' statistics
(:meth:`IntensityStats.merge`) and never sees an image.

What the statistics reveal about a site (they are released exactly: no differential-privacy
noise, outside any privacy accountant):

* over a fixed grid of ``bins`` intensity bins on the model scale [-1, 1]: the number of paired
  voxels whose source intensity falls in each bin and the sum of their target intensities, i.e.
  the site's mean T2w intensity (say) at each T1w intensity (the joint T1w/T2w intensity
  relation, reduced to its conditional mean), and its target-domain intensity histogram inside
  the masks with that histogram's sum;
* how many paired volumes and target volumes went in, and (from the voxel counts) how much head
  the site's scans hold;
* no spatial information (voxel positions are discarded) and, pooled over a site's patients, no
  per-patient value. A site with a single patient reveals that patient's histograms, and two
  releases of a site before and after one patient joins reveal that patient's histograms by
  difference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fedsynth.common.data.site import SiteData

logger = logging.getLogger(__name__)

DEFAULT_BINS = 256
LOW, HIGH = -1.0, 1.0  # the model scale the bins cover
BACKGROUND = -1.0  # what every baseline writes outside the mask
STATS_KIND = "fedsynth-intensity-stats"
STATS_VERSION = 1

CONSTANT = "constant"
HISTOGRAM = "histogram matching"
LOOKUP_TABLE = "lookup table"
# Weakest to strongest (on real T1w -> T2w): the order reports list them in.
BASELINE_NAMES = (CONSTANT, HISTOGRAM, LOOKUP_TABLE)


class Predictor(Protocol):
    """``predict(source, mask)``: (n, H, W) model-scale slices and bool masks -> (n, H, W)."""

    def __call__(self, source: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


# ----------------------------------------------------------------------------- the bins


def bin_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the fixed grid on [-1, 1]."""
    return np.linspace(LOW, HIGH, bins + 1)


def bin_centres(bins: int) -> np.ndarray:
    edges = bin_edges(bins)
    return (edges[:-1] + edges[1:]) / 2


def bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each value; values outside [-1, 1] fall in the end bins, 1.0 in the last."""
    scaled = (np.asarray(values, dtype=np.float64) - LOW) / (HIGH - LOW) * bins
    return np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)


# ----------------------------------------------------------------------------- the statistics


@dataclass(frozen=True, eq=False)
class IntensityStats:
    """Sufficient statistics of the three baselines, summed over voxels (and sites).

    Attributes:
        pair_counts: (bins,) int64, paired voxels (inside the evaluation mask of co-registered
            slices) per source-intensity bin.
        pair_sums: (bins,) float64, the sum of those voxels' target intensities per source bin.
        target_counts: (bins,) int64, target-domain voxels inside their masks per target bin.
        target_sum: the sum of those target intensities (the constant is its mean, exactly).
        sites: how many sites were summed.
        pairs: how many paired volumes went in.
        volumes: how many target-domain volumes went in.
    """

    pair_counts: np.ndarray
    pair_sums: np.ndarray
    target_counts: np.ndarray
    target_sum: float = 0.0
    sites: int = 1
    pairs: int = 0
    volumes: int = 0

    def __post_init__(self) -> None:
        counts = np.asarray(self.pair_counts, dtype=np.int64)
        bins = counts.shape[0] if counts.ndim == 1 else 0
        if bins < 2:
            raise ValueError(f"intensity statistics need at least 2 bins, got {counts.shape}")
        sums = np.asarray(self.pair_sums, dtype=np.float64)
        targets = np.asarray(self.target_counts, dtype=np.int64)
        for name, array in (("pair_sums", sums), ("target_counts", targets)):
            if array.shape != (bins,):
                raise ValueError(f"{name} has shape {array.shape}, expected ({bins},)")
        if (counts < 0).any() or (targets < 0).any():
            raise ValueError("intensity statistics: negative counts")
        if not np.isfinite(sums).all() or not math.isfinite(self.target_sum):
            raise ValueError("intensity statistics: non-finite sums")
        object.__setattr__(self, "pair_counts", counts)
        object.__setattr__(self, "pair_sums", sums)
        object.__setattr__(self, "target_counts", targets)
        object.__setattr__(self, "target_sum", float(self.target_sum))

    @classmethod
    def empty(cls, bins: int = DEFAULT_BINS) -> IntensityStats:
        """No voxels, no site: the neutral element of :meth:`merge`."""
        zeros = np.zeros(bins, dtype=np.int64)
        return cls(zeros, np.zeros(bins), zeros.copy(), 0.0, sites=0)

    @property
    def bins(self) -> int:
        return int(self.pair_counts.shape[0])

    @property
    def paired_voxels(self) -> int:
        return int(self.pair_counts.sum())

    @property
    def target_voxels(self) -> int:
        return int(self.target_counts.sum())

    def merge(self, other: IntensityStats) -> IntensityStats:
        """The statistics of both sites' data together (what a coordinator computes)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge statistics over {self.bins} and {other.bins} bins")
        return IntensityStats(
            self.pair_counts + other.pair_counts,
            self.pair_sums + other.pair_sums,
            self.target_counts + other.target_counts,
            self.target_sum + other.target_sum,
            sites=self.sites + other.sites,
            pairs=self.pairs + other.pairs,
            volumes=self.volumes + other.volumes,
        )

    __add__ = merge

    @classmethod
    def merge_all(cls, stats: Iterable[IntensityStats], bins: int | None = None) -> IntensityStats:
        """The sum of ``stats`` (empty statistics over ``bins`` when there are none)."""
        items = list(stats)
        total = cls.empty(bins if bins is not None else (items[0].bins if items else DEFAULT_BINS))
        for item in items:
            total = total.merge(item)
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain ints and floats (see :meth:`from_dict`)."""
        return {
            "kind": STATS_KIND,
            "version": STATS_VERSION,
            "range": [LOW, HIGH],
            "bins": self.bins,
            "sites": self.sites,
            "pairs": self.pairs,
            "volumes": self.volumes,
            "pair_counts": [int(v) for v in self.pair_counts],
            "pair_sums": [float(v) for v in self.pair_sums],
            "target_counts": [int(v) for v in self.target_counts],
            "target_sum": self.target_sum,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> IntensityStats:
        """Read :meth:`to_dict`'s output back.

        Raises:
            ValueError: not such a record, another version or range, or inconsistent arrays.
        """
        if not isinstance(record, Mapping) or record.get("kind") != STATS_KIND:
            raise ValueError(f"not intensity statistics (expected kind {STATS_KIND!r})")
        if record.get("version") != STATS_VERSION:
            raise ValueError(
                f"intensity statistics version {record.get('version')!r}: this fedsynth reads "
                f"version {STATS_VERSION}"
            )
        if [float(v) for v in record.get("range", [])] != [LOW, HIGH]:
            raise ValueError(f"intensity statistics over {record.get('range')}, expected [-1, 1]")
        try:
            stats = cls(
                np.asarray(record["pair_counts"], dtype=np.int64),
                np.asarray(record["pair_sums"], dtype=np.float64),
                np.asarray(record["target_counts"], dtype=np.int64),
                float(record["target_sum"]),
                sites=int(record.get("sites", 1)),
                pairs=int(record.get("pairs", 0)),
                volumes=int(record.get("volumes", 0)),
            )
        except KeyError as exc:
            raise ValueError(f"intensity statistics without {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(f"intensity statistics: {exc}") from None
        if stats.bins != record.get("bins"):
            raise ValueError(
                f"intensity statistics: {stats.bins} bins, the record says {record.get('bins')}"
            )
        return stats


def _checked(name: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    values = np.asarray(array)
    if shape is not None and values.shape != shape:
        raise ValueError(f"{name} has shape {values.shape}, expected {shape}")
    return values


def site_intensity_stats(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    targets: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    bins: int = DEFAULT_BINS,
) -> IntensityStats:
    """One site's statistics from its own arrays (model scale, (n, H, W)).

    Args:
        pairs: per paired volume, (source slices, target slices, evaluation mask): co-registered
            slices at the same positions, as :class:`fedsynth.common.data.datasets.PairedSlices`
            builds them; only voxels inside the mask count.
        targets: per target-domain volume, (slices, bool mask); every target volume of the site
            (the paired ones too). ``None``: the pairs' targets inside their masks.
        bins: the number of bins on [-1, 1].

    Raises:
        ValueError: mismatched shapes or non-finite values.
    """
    counts = np.zeros(bins, dtype=np.int64)
    sums = np.zeros(bins, dtype=np.float64)
    for index, (source, target, mask) in enumerate(pairs):
        source = _checked(f"pair {index}: source", source)
        target = _checked(f"pair {index}: target", target, source.shape)
        inside = _checked(f"pair {index}: mask", mask, source.shape).astype(bool)
        s, t = source[inside].astype(np.float64), target[inside].astype(np.float64)
        if not (np.isfinite(s).all() and np.isfinite(t).all()):
            raise ValueError(f"pair {index}: non-finite intensities inside the mask")
        where = bin_index(s, bins)
        counts += np.bincount(where, minlength=bins)
        sums += np.bincount(where, weights=t, minlength=bins)
    if targets is None:
        targets = [(t, m) for _, t, m in pairs]
    target_counts = np.zeros(bins, dtype=np.int64)
    target_sum = 0.0
    for index, (slices, mask) in enumerate(targets):
        slices = _checked(f"target {index}", slices)
        inside = _checked(f"target {index}: mask", mask, slices.shape).astype(bool)
        values = slices[inside].astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"target {index}: non-finite intensities inside the mask")
        target_counts += np.bincount(bin_index(values, bins), minlength=bins)
        target_sum += float(values.sum())
    return IntensityStats(
        counts, sums, target_counts, target_sum, pairs=len(pairs), volumes=len(targets)
    )


def site_statistics(site: SiteData, *, bins: int = DEFAULT_BINS) -> IntensityStats:
    """A site's statistics from its loaded data, as the site itself computes them.

    The pairs are ``site.paired``'s volumes, restricted to the slices usable in both (and their
    evaluation mask) as :class:`~fedsynth.common.data.datasets.PairedSlices` builds them; a pair
    whose volumes are not on one grid is left out (logged). The target histogram counts every target
    volume of the site (``domain_b`` and the paired targets, each once) inside its own mask.
    """
    from fedsynth.common.data.datasets import PairedSlices

    pairs = []
    for a, b in site.paired:
        try:
            paired = PairedSlices([(a, b)])
        except ValueError as exc:
            logger.warning("%s: pair left out of the baseline statistics: %s", site.name, exc)
            continue
        pairs.append((paired.a, paired.b, paired.masks))
    volumes = {str(v.scan.path): v for v in [*site.domain_b, *(b for _, b in site.paired)]}
    targets = [(v.stack.slices, v.stack.masks) for v in volumes.values()]
    return site_intensity_stats(pairs, targets, bins=bins)


def baseline_statistics(sites: Sequence[SiteData], *, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The training sites' merged statistics as a JSON-safe dict (for checkpoint metadata)."""
    return IntensityStats.merge_all((site_statistics(s, bins=bins) for s in sites), bins).to_dict()


# ----------------------------------------------------------------------------- the predictors


def _masked_output(source: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    source = np.asarray(source, dtype=np.float64)
    inside = np.ones(source.shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != source.shape:
        raise ValueError(f"mask of shape {inside.shape} for source of shape {source.shape}")
    return source, inside


@dataclass(frozen=True)
class ConstantBaseline:
    """The training sites' mean target intensity inside the mask, background outside."""

    value: float

    @classmethod
    def from_stats(cls, stats: IntensityStats) -> ConstantBaseline:
        if stats.target_voxels == 0:
            raise ValueError("no target-domain voxel in the statistics: no constant to predict")
        return cls(stats.target_sum / stats.target_voxels)

    def __call__(self, source: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        source, inside = _masked_output(source, mask)
        return np.where(inside, self.value, BACKGROUND).astype(np.float32)


@dataclass(frozen=True)
class LookupTableBaseline:
    """Per source-intensity bin, the training pairs' mean target intensity.

    ``table[k]`` is the value at the centre of bin ``k`` of the fixed grid on [-1, 1]; a source
    value is mapped by linear interpolation between bin centres (the end values below the first
    and above the last centre), inside the mask; background outside.
    """

    table: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        table = np.asarray(self.table, dtype=np.float64)
        if table.ndim != 1 or table.shape[0] < 2 or not np.isfinite(table).all():
            raise ValueError("a lookup table needs at least 2 finite values")
        object.__setattr__(self, "table", table)

    @classmethod
    def from_stats(cls, stats: IntensityStats) -> LookupTableBaseline:
        """The per-bin means; a bin no paired voxel fell in takes the linear interpolation of
        its nearest filled neighbours (the nearest filled bin's value beyond the end ones)."""
        filled = stats.pair_counts > 0
        if not filled.any():
            raise ValueError("no paired voxel in the statistics: no lookup table to fit")
        centres = bin_centres(stats.bins)
        means = stats.pair_sums[filled] / stats.pair_counts[filled]
        return cls(np.interp(centres, centres[filled], means))

    @property
    def centres(self) -> np.ndarray:
        return bin_centres(self.table.shape[0])

    def __call__(self, source: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        source, inside = _masked_output(source, mask)
        out = np.full(source.shape, BACKGROUND, dtype=np.float32)
        out[inside] = np.interp(source[inside], self.centres, self.table).astype(np.float32)
        return out


class HistogramMatcher:
    """Quantile mapping fitted on reference (target-domain) foreground values.

    Args:
        reference: target-domain intensities (any shape; only finite values are used).
        quantiles: number of quantile knots of the piecewise-linear map.

    In a federation only histograms can travel: :meth:`from_stats` / :meth:`from_histogram` fit
    the reference quantiles from a histogram instead (uniform within each bin, so each quantile
    is within one bin width, 2 / bins, of the sample quantile).
    """

    def __init__(self, reference: np.ndarray, quantiles: int = 256):
        values = np.asarray(reference, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("the reference distribution is empty")
        self.levels = np.linspace(0.0, 1.0, quantiles)
        self.reference = np.quantile(values, self.levels)

    @classmethod
    def from_histogram(
        cls,
        counts: np.ndarray,
        *,
        low: float = LOW,
        high: float = HIGH,
        quantiles: int = 256,
    ) -> HistogramMatcher:
        """Reference quantiles of a histogram over equal bins on [low, high]."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("the reference histogram is empty")
        edges = np.linspace(low, high, counts.size + 1)
        share = counts / counts.sum()
        cdf = np.concatenate([[0.0], np.cumsum(share)])
        filled = np.flatnonzero(counts > 0)
        levels = np.linspace(0.0, 1.0, quantiles)
        # Bin k holds level q when cdf[k] < q <= cdf[k + 1] (so it is filled); level 0 is the
        # first filled bin's lower edge. Within a bin the mass is spread uniformly.
        k = np.searchsorted(cdf[1:], levels, side="left")
        k = np.clip(np.where(levels > 0, k, filled[0]), filled[0], filled[-1])
        within = np.clip((levels - cdf[k]) / np.maximum(share[k], 1e-300), 0.0, 1.0)
        matcher = cls.__new__(cls)
        matcher.levels = levels
        matcher.reference = edges[k] + within * (edges[k + 1] - edges[k])
        return matcher

    @classmethod
    def from_stats(cls, stats: IntensityStats, quantiles: int = 256) -> HistogramMatcher:
        if stats.target_voxels == 0:
            raise ValueError("no target-domain voxel in the statistics: nothing to match to")
        return cls.from_histogram(stats.target_counts, quantiles=quantiles)

    def __call__(
        self, source: np.ndarray, mask: np.ndarray | None = None, background: float = -1.0
    ) -> np.ndarray:
        """Map ``source`` (quantiles over its ``mask``); outside the mask -> ``background``."""
        source, inside = _masked_output(source, mask)
        out = np.full(source.shape, background, dtype=np.float32)
        if not inside.any():
            return out
        knots = np.quantile(source[inside], self.levels)
        # Strictly increasing knots for interpolation (flat stretches share a level).
        knots, unique = np.unique(knots, return_index=True)
        out[inside] = np.interp(source[inside], knots, self.reference[unique]).astype(np.float32)
        return out


def fit_baselines(stats: IntensityStats) -> tuple[dict[str, Predictor], dict[str, str]]:
    """Every baseline the statistics can fit, by name (:data:`BASELINE_NAMES` order), and why
    the others cannot be fitted (e.g. no co-registered pair: no lookup table)."""
    makers: dict[str, Callable[[IntensityStats], Predictor]] = {
        CONSTANT: ConstantBaseline.from_stats,
        HISTOGRAM: HistogramMatcher.from_stats,
        LOOKUP_TABLE: LookupTableBaseline.from_stats,
    }
    fitted: dict[str, Predictor] = {}
    skipped: dict[str, str] = {}
    for name in BASELINE_NAMES:
        try:
            fitted[name] = makers[name](stats)
        except ValueError as exc:
            skipped[name] = str(exc)
    return fitted, skipped
