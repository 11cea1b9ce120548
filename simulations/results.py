"""What a simulated experiment measured, as one JSON file the report is drawn from.

``runs/<name>/results.json`` is written by :mod:`fedsynth.simulations.experiment` and read by
:mod:`fedsynth.simulations.report`; nothing in it needs the images or the models again, so a report
can be redrawn (or several experiments compared) long after the runs. Metric names are those of
:func:`fedsynth.common.metrics.image_metrics` (``psnr_masked``, ``ssim_masked``, ``mae_masked``,
``kspace_low`` ...), each a mean over a site's held-out test slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedsynth.common.baselines import BASELINE_NAMES
from fedsynth.common.baselines import CONSTANT as CONSTANT
from fedsynth.common.baselines import HISTOGRAM as HISTOGRAM
from fedsynth.common.baselines import LOOKUP_TABLE as LOOKUP_TABLE
from fedsynth.common.io import READABLE, atomic_write_text

RESULTS_NAME = "results.json"

# The model names every experiment may hold; "local:<site>" is one local-only model per site. The
# naive baselines of fedsynth.common.baselines (NAIVE: CONSTANT, HISTOGRAM, LOOKUP_TABLE) are fitted
# from the training sites' summed intensity statistics, with no training.
UNTRAINED = "untrained"
# The generators round 1 started from, when not random (a warm start or initial_generators).
STARTING_POINT = "starting point"
FEDERATED = "federated"
POOLED = "pooled"
LOCAL_PREFIX = "local:"
NAIVE = BASELINE_NAMES


def local_model(site: str) -> str:
    return f"{LOCAL_PREFIX}{site}"


class _Model(BaseModel):
    # NaN (an empty mask) and inf (a perfect PSNR) must survive the round trip through JSON.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class SiteSplit(_Model):
    """One simulated hospital of a split.

    ``subjects_a`` / ``subjects_b``: training subjects that bring a domain-A / domain-B scan (a
    subject with both counts in both; in training each feeds one side only). ``slices_*``: the
    model-scale axial slices those scans give. ``test_*``: held-out paired subjects, never
    trained on. ``excluded``: why the site cannot train (it lacks a domain), else ``None``.
    """

    site: str
    train_subjects: int
    subjects_a: int
    subjects_b: int
    slices_a: int = 0
    slices_b: int = 0
    test_subjects: int = 0
    test_slices: int = 0
    unpaired_fraction: float = 0.0
    misalignment: str = "none"
    missing: list[str] = Field(default_factory=list)  # domains the site lacks ("A", "B")
    scanner: dict[str, Any] = Field(default_factory=dict)  # phantom: field strength, voxels
    source: list[str] = Field(default_factory=list)  # where its subjects came from
    excluded: str | None = None


class SplitSummary(_Model):
    scheme: str  # "counts", "ratios", "dirichlet", "power", "natural"
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    pool: str = "phantom"  # "phantom" or the real site folders' names
    sites: list[SiteSplit]


class RoundPoint(_Model):
    """The federated model after one round (round 0: before training)."""

    round: int
    per_site: dict[str, dict[str, float]] = Field(default_factory=dict)  # test metrics per site
    mean: dict[str, float] = Field(default_factory=dict)  # test-slice-weighted over sites
    epsilon: dict[str, float] = Field(default_factory=dict)  # cumulative, per site
    bytes_up: dict[str, int] = Field(default_factory=dict)
    bytes_down: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0


class ModelResult(_Model):
    """One trained (or untrained) model, evaluated on every site's held-out test subjects."""

    name: str  # UNTRAINED, STARTING_POINT, FEDERATED, POOLED, local_model(site) or one of NAIVE
    per_site: dict[str, dict[str, float]] = Field(default_factory=dict)
    mean: dict[str, float] = Field(default_factory=dict)  # test-slice-weighted over sites
    train_seconds: float = 0.0
    epochs: int = 0  # local epochs (per site for federated: rounds x local epochs)
    steps: int = 0
    checkpoint: str | None = None  # relative to the experiment folder
    skipped: str | None = None  # why the model was not trained (e.g. a site without domain B)
    selected: str | None = None  # how the scored checkpoint was chosen (on validation data)


def sample_key(model: str) -> str:
    """The ``.npz`` key of a model's synthesis (``local:site-1`` -> ``local_site-1``,
    ``lookup table`` -> ``lookup_table``)."""
    return model.replace(":", "_").replace(" ", "_")


class SampleSlices(_Model):
    """A sample slice per site for the figure grid: ``.npz`` with ``source``, ``target``,
    ``mask`` and one :func:`sample_key` array per model (model scale, [-1, 1], (H, W))."""

    site: str
    path: str  # relative to the experiment folder
    subject: str
    slice_index: int


class ExperimentResults(_Model):
    """Everything a report shows; ``results.json`` in the experiment folder."""

    name: str
    direction: str
    preset: str | None = None
    variant: dict[str, Any] = Field(default_factory=dict)  # a grid cell's settings
    config_path: str = "config.resolved.toml"
    split: SplitSummary
    models: list[ModelResult] = Field(default_factory=list)
    rounds: list[RoundPoint] = Field(default_factory=list)
    samples: list[SampleSlices] = Field(default_factory=list)
    # enabled, level, delta, target_epsilon, noise_multiplier, budget_epsilon, max_grad_norm,
    # worst_epsilon (the last round's worst site)
    privacy: dict[str, Any] = Field(default_factory=dict)
    timing: dict[str, float] = Field(default_factory=dict)  # phase -> seconds
    machine: str = ""
    headline: dict[str, float] = Field(default_factory=dict)
    # The naive baselines' source: {"sites": the training sites whose statistics were summed,
    # "statistics": fedsynth.common.baselines.IntensityStats.to_dict() of the sum}.
    naive: dict[str, Any] = Field(default_factory=dict)

    def model(self, name: str) -> ModelResult | None:
        return next((m for m in self.models if m.name == name), None)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / RESULTS_NAME
        atomic_write_text(path, self.model_dump_json(indent=2), READABLE)
        return path

    @classmethod
    def read(cls, folder_or_file: Path) -> ExperimentResults:
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / RESULTS_NAME
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no results (run `fedsynth simulate` first)") from None
