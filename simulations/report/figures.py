"""Matplotlib figures for reports, on the Agg canvas (no pyplot, no global state): the writer
that saves them, shared axes and legends, grouped bars, a sample slice's panels, colours."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedsynth.common.io import READABLE, atomic_save
from fedsynth.simulations.report.extract import MAE, PSNR, SSIM, _ordered_models
from fedsynth.simulations.results import (
    CONSTANT,
    FEDERATED,
    HISTOGRAM,
    LOOKUP_TABLE,
    POOLED,
    STARTING_POINT,
    UNTRAINED,
    ExperimentResults,
    SampleSlices,
    local_model,
    sample_key,
)

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
DPI = 110

# The figure names this module writes; stale ones from an earlier report are removed.
_FIXED_FIGURES = frozenset({"curves.png", "sites.png", "epsilon.png", "kspace.png", "grid.png"})
_SAMPLES_PREFIX = "samples-"

_FIXED_COLOURS = {
    UNTRAINED: "tab:gray",
    FEDERATED: "tab:blue",
    STARTING_POINT: "tab:cyan",
    POOLED: "tab:green",
    CONSTANT: "silver",
    HISTOGRAM: "sienna",
    LOOKUP_TABLE: "black",
}
_OTHER_COLOURS = (
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:red",
)
_METRIC_TITLES = {PSNR: "Masked PSNR (dB)", SSIM: "Masked SSIM", MAE: "Masked MAE"}


class _FigureWriter:
    """Saves figures under ``<folder>/figures/`` and remembers which, to drop stale ones."""

    def __init__(self, folder: Path) -> None:
        self.directory = folder / FIGURES_DIR
        self.written: list[str] = []

    def save(self, fig: Figure, name: str) -> str:
        """Write ``fig`` as ``name`` (PNG, atomically); return its path relative to the report."""
        save_png(fig, self.directory / name)
        fig.clear()
        self.written.append(name)
        return f"{FIGURES_DIR}/{name}"

    def remove_stale(self) -> None:
        """Remove the figures an earlier report drew that this one did not (e.g. privacy off)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*.png"):
            ours = path.name in _FIXED_FIGURES or path.name.startswith(_SAMPLES_PREFIX)
            if ours and path.name not in self.written:
                logger.debug("removing stale figure %s", path)
                path.unlink()


def _round_axis(ax: Axes) -> None:
    """A per-round plot's x axis: whole rounds, small ticks, a light grid."""
    ax.set_xlabel("round", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG at :data:`DPI`, atomically and world-readable."""
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), READABLE)


def figure_grid(width: float, height: float, rows: int, columns: int) -> tuple[Figure, np.ndarray]:
    """A figure of ``width`` x ``height`` inches on the Agg canvas, with a ``rows`` x ``columns``
    array of axes (always 2D) under the constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False)


def _new_figure(width: float, height: float, ncols: int) -> tuple[Figure, list[Axes]]:
    fig, axes = figure_grid(width, height, 1, ncols)
    return fig, list(axes[0])


def _figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for the figure, right of the panels, without repeated labels."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside right upper",
            fontsize=7,
            frameon=False,
        )


def _grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    colours: Sequence[str],
) -> None:
    """Bars of each series side by side within each group; NaN values leave a gap."""
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        points = [(g + offset, v) for g, v in enumerate(values) if math.isfinite(v)]
        ax.bar(
            [x for x, _ in points],
            [v for _, v in points],
            width=width,
            color=colours[index],
            label=name,
        )
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _crop_bottom(ax: Axes, values: Iterable[float]) -> None:
    """Start a PSNR axis a little below the smallest bar, so differences stay visible."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(bottom=max(0.0, math.floor(low - max(1.0, 0.2 * (high - low)))))


def _sample_figure(results: ExperimentResults, folder: Path, sample: SampleSlices) -> Figure:
    """source | each model | target | |model - target| of one saved slice."""
    with np.load(folder / sample.path, allow_pickle=False) as data:
        arrays = {key: np.asarray(data[key], dtype=np.float64) for key in data.files}
    for key in ("source", "target"):
        if key not in arrays:
            raise KeyError(f"{sample.path} has no {key!r} array (has {sorted(arrays)})")
    source, target = _image(arrays["source"]), _image(arrays["target"])
    mask = _image(arrays["mask"]) if "mask" in arrays else None
    synthesised: list[tuple[str, np.ndarray]] = []
    for model in _ordered_models(results):
        for key in (model.name, sample_key(model.name)):
            if key in arrays:
                synthesised.append((model.name, _image(arrays[key])))
                break
    error_of = next((item for item in synthesised if item[0] == FEDERATED), None)
    if error_of is None and synthesised:
        error_of = synthesised[0]
    panels = [("source", source), *synthesised, ("target", target)]
    columns = len(panels) + (1 if error_of is not None else 0)
    fig, axes = _new_figure(1.7 * columns + 0.6, 2.2, columns)
    for ax, (title, image) in zip(axes, panels, strict=False):
        ax.imshow(image, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    if error_of is not None:
        ax = axes[-1]
        name, prediction = error_of
        if prediction.shape != target.shape:
            raise ValueError(f"{name} is {prediction.shape}, the target {target.shape}")
        error = np.abs(prediction - target) / 2.0  # model scale [-1, 1] -> [0, 1] units
        vmax = float(np.clip(np.percentile(error, 99), 0.05, 1.0))
        shown = ax.imshow(error, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        if mask is not None and mask.shape == target.shape and np.count_nonzero(mask) > 0:
            ax.contour(mask > 0.5, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"|{name} − target|", fontsize=8)
        ax.set_axis_off()
        colorbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{sample.site}: {sample.subject}, slice {sample.slice_index}", fontsize=9)
    return fig


def _image(array: np.ndarray) -> np.ndarray:
    image = np.squeeze(array)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, found shape {array.shape}")
    return image


def _cycle(index: int) -> str:
    return _OTHER_COLOURS[index % len(_OTHER_COLOURS)]


def _palette(results: ExperimentResults) -> dict[str, str]:
    """One colour per model, the same in every figure; a site's epsilon curve takes the colour
    of its local-only model."""
    palette = dict(_FIXED_COLOURS)
    names = [local_model(site.site) for site in results.split.sites]
    names += [m.name for m in _ordered_models(results) if m.name not in names]
    for name in names:
        if name not in palette:
            palette[name] = _cycle(len(palette) - len(_FIXED_COLOURS))
    return palette


def _plottable(value: float | None) -> float:
    """A value a line plot can take: NaN for missing or infinite ones."""
    if value is None or not math.isfinite(value):
        return math.nan
    return float(value)
