"""What a report reads out of an experiment's results: models in display order, trained
models, local models by site size, mean metrics, privacy facts, epsilon series and timing."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedsynth.simulations.report.tables import MISSING, _kv, _short
from fedsynth.simulations.results import (
    FEDERATED,
    LOCAL_PREFIX,
    NAIVE,
    POOLED,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
    RoundPoint,
)

MAX_LOCAL_LINES = 6  # above this many local models, figures show the smallest and largest only

PSNR = "psnr_masked"
SSIM = "ssim_masked"
MAE = "mae_masked"
BANDS = ("kspace_low", "kspace_mid", "kspace_high")


def _ordered_models(results: ExperimentResults) -> list[ModelResult]:
    """Untrained, the naive baselines (weakest first), federated, pooled, then local models in
    split order, then anything else."""
    fixed = {name: index for index, name in enumerate((UNTRAINED, *NAIVE, FEDERATED, POOLED))}
    site_rank = {site.site: index for index, site in enumerate(results.split.sites)}

    def key(model: ModelResult) -> tuple[int, int, str]:
        if model.name in fixed:
            return (0, fixed[model.name], "")
        if model.name.startswith(LOCAL_PREFIX):
            site = _site_of(model)
            return (1, site_rank.get(site, len(site_rank)), site)
        return (2, 0, model.name)

    return sorted(results.models, key=key)


def _trained(model: ModelResult | None) -> ModelResult | None:
    return model if model is not None and model.skipped is None else None


def _site_of(model: ModelResult) -> str:
    return model.name.removeprefix(LOCAL_PREFIX)


def _train_subjects(results: ExperimentResults) -> dict[str, int]:
    return {site.site: site.train_subjects for site in results.split.sites}


def _local_models(results: ExperimentResults) -> list[ModelResult]:
    return [
        m for m in _ordered_models(results) if m.name.startswith(LOCAL_PREFIX) and m.skipped is None
    ]


def _by_size(results: ExperimentResults, models: Sequence[ModelResult]) -> list[ModelResult]:
    """Local models from the smallest site (by training subjects) to the largest."""
    sizes = _train_subjects(results)
    unknown = max(sizes.values(), default=0) + 1
    return sorted(models, key=lambda m: (sizes.get(_site_of(m), unknown), _site_of(m)))


def _smallest_local(results: ExperimentResults) -> ModelResult | None:
    ranked = _by_size(results, _local_models(results))
    return ranked[0] if ranked else None


def _shown_locals(
    results: ExperimentResults, models: Sequence[ModelResult]
) -> tuple[list[ModelResult], bool]:
    """All local models, or the smallest and largest sites' when there are too many to show."""
    if len(models) <= MAX_LOCAL_LINES:
        return list(models), False
    ranked = _by_size(results, models)
    keep = {ranked[0].name, ranked[-1].name}
    return [m for m in models if m.name in keep], True


def _baselines(results: ExperimentResults) -> tuple[list[ModelResult], bool]:
    """The models drawn as horizontal lines beside the federated curve: pooled, untrained, the
    best naive baseline and the local models."""
    fixed = [
        _trained(results.model(POOLED)),
        _trained(results.model(UNTRAINED)),
        _best_naive(results),
    ]
    local, trimmed = _shown_locals(results, _local_models(results))
    return [m for m in fixed if m is not None] + local, trimmed


def _figure_models(
    results: ExperimentResults, keep: Callable[[ModelResult], bool]
) -> tuple[list[ModelResult], bool]:
    """Trained models for which ``keep(model)`` holds, local ones trimmed as for the curves."""
    models = [m for m in _ordered_models(results) if m.skipped is None and keep(m)]
    local = [m for m in models if m.name.startswith(LOCAL_PREFIX)]
    shown, trimmed = _shown_locals(results, local)
    names = {m.name for m in shown}
    return [m for m in models if not m.name.startswith(LOCAL_PREFIX) or m.name in names], trimmed


def _ordered_sites(results: ExperimentResults, *tables: Mapping[str, Any]) -> list[str]:
    """The sites that appear in any of ``tables``, in split order, then the others sorted."""
    present = {site for table in tables for site in table}
    ordered = [site.site for site in results.split.sites if site.site in present]
    return ordered + sorted(present - set(ordered))


def _get(metrics: Mapping[str, float] | None, key: str) -> float:
    """``metrics[key]`` as a float; NaN when absent or not a number."""
    if metrics is None:
        return math.nan
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _metric(model: ModelResult | None, key: str) -> float:
    """A model's mean over all sites' test slices; NaN when absent."""
    return _get(model.mean, key) if model is not None else math.nan


def _privacy_on(results: ExperimentResults) -> bool:
    return bool(results.privacy.get("enabled"))


def _budget(privacy: Mapping[str, Any]) -> float | None:
    for key in ("budget_epsilon", "target_epsilon"):
        value = privacy.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _unit(privacy: Mapping[str, Any]) -> str:
    """What one epsilon protects: a patient, one training slice, or a whole site."""
    level = privacy.get("level", "example")  # results written before the patient unit
    return {"patient": "patient-level", "example": "slice-level", "site": "site-level"}.get(
        str(level), str(level)
    )


def _epsilon_series(results: ExperimentResults) -> dict[str, list[tuple[int, float]]]:
    """Per site, ``(round, cumulative epsilon)`` for the rounds that record one."""
    series: dict[str, list[tuple[int, float]]] = {}
    rounds: list[RoundPoint] = sorted(results.rounds, key=lambda point: point.round)
    for site in _ordered_sites(results, *(point.epsilon for point in rounds)):
        series[site] = [
            (point.round, float(point.epsilon[site])) for point in rounds if site in point.epsilon
        ]
    return series


def _worst_epsilon(results: ExperimentResults) -> float:
    """The largest final epsilon over the sites; NaN when none was recorded."""
    finals = [points[-1][1] for points in _epsilon_series(results).values() if points]
    finals = [value for value in finals if not math.isnan(value)]
    return max(finals) if finals else math.nan


def _has_total(timing: Mapping[str, float]) -> bool:
    return any(phase.lower() == "total" for phase in timing)


def _total_seconds(timing: Mapping[str, float]) -> float:
    """The ``total`` phase when recorded, else the sum of the phases; NaN without timing."""
    for phase, seconds in timing.items():
        if phase.lower() == "total":
            return float(seconds)
    return float(sum(timing.values())) if timing else math.nan


def _scanner(scanner: Mapping[str, Any]) -> str:
    """A compact scanner description: field strength and voxel size when known."""
    parts = []
    field = scanner.get("field_strength_t")
    if field is not None:
        parts.append(f"{_short(field)} T")
    voxels = scanner.get("voxel_size_mm")
    if isinstance(voxels, list | tuple):
        parts.append("×".join(_short(v) for v in voxels) + " mm")
    elif voxels is not None:
        parts.append(f"{_short(voxels)} mm")
    if not parts and scanner:
        items = list(scanner.items())
        text = _kv(dict(items[:3]))
        return text + (", …" if len(items) > 3 else "")
    return ", ".join(parts) or MISSING


def _best_naive(results: ExperimentResults) -> ModelResult | None:
    """The naive baseline with the best mean masked PSNR (None when none was scored)."""
    scored = [
        model
        for name in NAIVE
        if (model := _trained(results.model(name))) is not None
        and math.isfinite(_metric(model, PSNR))
    ]
    return max(scored, key=lambda model: _metric(model, PSNR), default=None)
