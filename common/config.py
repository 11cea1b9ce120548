"""Configuration of a whole fedsynth run: data, model, training, privacy, federation, simulation.

A run's configuration is built in layers, each overriding the one before:

1. the field defaults below (Zhu et al. 2017 CycleGAN values where the paper fixes them);
2. a preset (``cpu-small``, ``gpu-paper``; TOML files shipped in ``common/presets/``);
3. a TOML file (``--config run.toml``), which may itself name a preset (``preset = "cpu-small"``);
4. environment variables ``FEDSYNTH_<SECTION>__<FIELD>`` (``FEDSYNTH_TRAINING__LR=1e-4``);
5. command-line overrides ``--set section.field=value``.

Every value remembers where it came from, so an invalid one fails with its dotted name, the value
found, where it was found and what is allowed. :func:`write_resolved_config` writes the final
configuration beside a run's outputs, marking what differs from the defaults.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic.functional_validators import AfterValidator

from fedsynth.common.io import atomic_write_text
from fedsynth.common.modalities import Direction

ENV_PREFIX = "FEDSYNTH_"
ENV_NESTED = "__"
RESOLVED_CONFIG_NAME = "config.resolved.toml"


# --------------------------------------------------------------------------- value types


def _check_direction(value: str) -> str:
    return str(Direction.parse(value))


DirectionStr = Annotated[str, AfterValidator(_check_direction)]


def _check_device(value: str) -> str:
    text = value.strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError("must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>'")


DeviceStr = Annotated[str, AfterValidator(_check_device)]


def _absolute(path: Path) -> Path:
    """Relative to where the configuration is loaded: the ServerApp may run in another folder."""
    return path.expanduser().absolute()


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]

Misalignment = Literal["none", "slight", "moderate", "severe"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- sections


class DataConfig(_Section):
    """Where a site's scans are and how they become 2D training slices."""

    direction: DirectionStr = Field("T1w->T2w", description="Synthesis direction A->B.")
    spacing_mm: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="Voxel spacing (mm, RAS order) every volume is resampled to."
    )
    image_size: int = Field(256, ge=16, le=1024, description="Height = width of model slices.")
    min_foreground: float = Field(
        0.05, ge=0.0, lt=1.0, description="Axial slices with less foreground are not used."
    )
    percentiles: tuple[float, float] = Field(
        (0.5, 99.5),
        description="MR: the mask's first percentile maps to -1, and the scale is anchored on "
        "its 75th percentile (mapped to -1/3; "
        "fedsynth.common.data.masks.standardisation_range), so lesions and CSF do not set it. "
        "PET: both percentiles map to -1 and 1.",
    )
    ct_window_hu: tuple[float, float] = Field(
        (-1024.0, 2048.0), description="CT: this Hounsfield window maps to [-1, 1]."
    )
    misalignment: Misalignment = Field(
        "none",
        description="Random affine augmentation (see fedsynth.common.data.misalign): drawn "
        "independently for the two images of a weakly paired example, for B only in an "
        "unpaired one.",
    )
    augment_gamma: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Random gamma on each training source image, gamma = exp(U(-g, g)) on the "
        "[0, 1] scale: robustness to other sites' intensity curves (0 = off).",
    )
    pairing: Literal["weak", "unpaired"] = Field(
        "weak",
        description="'weak': a session's two contrasts train as a weakly paired example (the "
        "target resampled onto the source's grid by the scanner affines), the rest unpaired; "
        "'unpaired': plain CycleGAN, no subject feeding both domains (for comparison).",
    )
    skip_bad: bool = Field(False, description="Skip unreadable or invalid scans with a warning.")
    max_axis_voxels: int = Field(
        1024,
        ge=16,
        description="Refuse a scan whose header claims more voxels than this on an axis, or "
        "whose field of view would, resampled to spacing_mm (read before any voxel).",
    )
    max_voxels: int = Field(
        1 << 28,
        ge=4096,
        description="Refuse a scan claiming more voxels in all (before or after resampling).",
    )
    max_decompressed_gib: float = Field(
        2.0,
        gt=0.0,
        description="Refuse a scan whose header claims more bytes than this decompressed "
        "(gzip bombs, mislabelled exports); a file is never inflated past its header's claim.",
    )
    voxel_mm: tuple[float, float] = Field(
        (0.1, 20.0),
        description="Refuse a scan with a voxel size outside this range (mm): a units error.",
    )
    cache_dir: Path | None = Field(
        None, description="Preprocessed-slice cache; default: <run or state dir>/cache."
    )
    validation_fraction: float = Field(
        0.15,
        ge=0.0,
        le=0.5,
        description="Share of a training site's weakly paired data held out of training to "
        "choose the model on (the best round or epoch; fedsynth.common.data.validation): "
        "whole subjects when the site has 4 or more paired subjects, else blocks of 4 axial "
        "slices per session; 0 holds nothing out. Test sites are never split.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if any(s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be positive in every axis, found {self.spacing_mm}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, found {lo}, {hi}")
        if self.ct_window_hu[0] >= self.ct_window_hu[1]:
            raise ValueError(
                f"ct_window_hu must be (low, high) with low < high, found {self.ct_window_hu}"
            )
        if not 0.0 < self.voxel_mm[0] < self.voxel_mm[1]:
            raise ValueError(
                f"voxel_mm must be (smallest, largest) with 0 < smallest < largest, found "
                f"{self.voxel_mm}"
            )
        return self


class ModelConfig(_Section):
    """Networks (CycleGAN generators and discriminators; Zhu et al. 2017 names in comments)."""

    generator: Literal["resnet", "unet"] = "resnet"
    intensity_prior: int = Field(
        0,
        ge=0,
        le=257,
        description="Knots of a learnt intensity lookup table the generator corrects "
        "(fedsynth.common.models.intensity): the body sees [x, map(x)] and adds a residual "
        "to map(x). 0 = off (a plain generator).",
    )
    ngf: int = Field(64, ge=4, le=512, description="Generator filters in the first layer.")
    n_blocks: int = Field(9, ge=1, le=32, description="Residual blocks (ResNet generator).")
    ndf: int = Field(64, ge=4, le=512, description="Discriminator filters in the first layer.")
    d_layers: int = Field(3, ge=1, le=6, description="PatchGAN layers (3 gives 70x70 patches).")
    unet_depth: int = Field(
        6, ge=2, le=8, description="U-Net down-samplings (image_size must divide by 2**depth)."
    )
    registration_filters: int = Field(
        16, ge=4, le=128, description="Filters of the RegGAN registration network R."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.intensity_prior == 1:
            raise ValueError("intensity_prior needs 0 (off) or at least 2 knots, found 1")
        return self


class TrainingConfig(_Section):
    """Local training at one site (the same trainer serves federated and baseline runs)."""

    device: DeviceStr = "auto"
    seed: int = 0
    batch_size: int = Field(1, ge=1, le=1024)
    lr: float = Field(2e-4, gt=0.0, lt=1.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    epochs: int = Field(200, ge=1, description="Total epochs (constant lr, then linear decay).")
    decay_epochs: int = Field(100, ge=0, description="Final epochs over which lr decays to 0.")
    gan_loss: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    lambda_cycle: float = Field(10.0, ge=0.0)
    lambda_identity: float = Field(5.0, ge=0.0)
    registration: Literal["auto", "on", "off"] = Field(
        "auto",
        description="RegGAN correction loss; auto = on when data.misalignment is not 'none'.",
    )
    lambda_registration: float = Field(
        20.0,
        ge=0.0,
        description="RegGAN correction loss (L1 after R's warp) on weakly paired examples.",
    )
    lambda_smooth: float = Field(
        10.0, ge=0.0, description="Smoothness of R's displacement field (RegGAN, pixel units)."
    )
    lambda_paired: float = Field(
        100.0,
        ge=0.0,
        description="pix2pix L1 between G(x) and its weakly paired target, both directions "
        "(Isola et al. 2017: 100), with registration off; with it on, both directions use "
        "lambda_registration after R's alignment instead (fedsynth.common.training.objectives).",
    )
    background_weight: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Weight of a pixel outside the image's head mask in every L1 loss (cycle, "
        "identity, paired, correction); head pixels weigh 1, each example is normalised.",
    )
    pool_size: int = Field(50, ge=0, description="Fake-image pool (0 = off; forced off under DP).")
    max_grad_norm: float | None = Field(
        None, gt=0.0, description="Per-network gradient-norm clipping without DP (None = off)."
    )
    bf16: bool = Field(False, description="bfloat16 autocast on CUDA.")
    num_workers: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.decay_epochs > self.epochs:
            raise ValueError(
                f"decay_epochs ({self.decay_epochs}) cannot exceed epochs ({self.epochs})"
            )
        return self


class PrivacyConfig(_Section):
    """Differential privacy, by its unit: a patient, one training example, or a whole site.

    ``level = "patient"`` (the default): DP-SGD at each site where a Poisson batch draws
    *patients* (every session of one subject is one patient) and each drawn patient gives one
    weakly paired slice, so per-sample clipping (``max_grad_norm``) bounds every patient's part
    of a step and the site's accountant composes at patient level (:mod:`fedsynth.common.privacy`).
    Patients with one modality only are left out: an unpaired example mixes two patients.
    ``level = "example"``: the same DP-SGD over slices (one A slice and its B partner), kept for
    comparison; it protects single slices, not people. ``level = "site"``: each site clips its
    whole round update to ``site_clip_norm`` and the coordinator adds Gaussian noise to the
    average (DP-FedAvg, McMahan et al. 2018); the coordinator accounts for it.
    """

    enabled: bool = False
    level: Literal["patient", "example", "site"] = "patient"
    noise_multiplier: float | None = Field(
        None,
        ge=0.0,
        description="Noise std over clipping bound; per private network (DP-SGD) or "
        "on the sum of site updates (site level).",
    )
    target_epsilon: float | None = Field(
        None, gt=0.0, description="Calibrate the noise before round 1 to reach this epsilon."
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-sample clipping bound.")
    accountant: Literal["rdp", "prv"] = "prv"
    grad_sample_mode: Literal["hooks", "functorch"] = Field(
        "hooks", description="How Opacus computes per-sample gradients."
    )
    max_physical_batch_size: int | None = Field(
        None,
        ge=1,
        description="Split Poisson batches into chunks of at most this many examples "
        "(bounds per-sample gradient memory; the privacy analysis is unchanged).",
    )
    budget_epsilon: float | None = Field(
        None, gt=0.0, description="A site refuses to train once its epsilon would exceed this."
    )
    on_budget_exhausted: Literal["continue", "stop"] = Field(
        "continue", description="Server behaviour when a site has spent its budget."
    )
    site_clip_norm: float = Field(
        1.0, gt=0.0, description="Site level: bound on the L2 norm of a site's round update."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Expected Poisson batch of DP-SGD: patients (level 'patient') or examples "
        "(level 'example'); default training.batch_size.",
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of DP-SGD at the sites (default training.lr, which the "
        "warm start and runs without DP keep).",
    )
    networks: Literal["objective", "all"] = Field(
        "objective",
        description="Level 'patient': train (and privatise) only the networks the A->B paired "
        "objective needs (G_AB, D_B, and R when registration is on); G_BA and D_A keep the "
        "weights they start from. 'all': all of them, both directions.",
    )
    trainable: Literal["all", "decoder"] = Field(
        "all",
        description="Under DP-SGD, which generator parameters train: 'all', or 'decoder' (a "
        "U-Net's up-sampling path, every normalisation layer and the intensity prior; the "
        "encoder keeps its starting weights). Meant for fine-tuning a warm start.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set either noise_multiplier or target_epsilon, not both")
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy.enabled needs noise_multiplier or target_epsilon")
        return self

    @property
    def dp_sgd(self) -> bool:
        """DP-SGD at the sites (level ``"patient"`` or ``"example"``)."""
        return self.enabled and self.level in ("patient", "example")

    @property
    def patient_level(self) -> bool:
        """DP-SGD whose unit is the patient."""
        return self.enabled and self.level == "patient"

    @property
    def one_way(self) -> bool:
        """Patient-level DP-SGD training only the A->B networks (``networks = "objective"``)."""
        return self.patient_level and self.networks == "objective"

    @property
    def site_level(self) -> bool:
        """Client-level DP (clipped site updates, noise added by the coordinator)."""
        return self.enabled and self.level == "site"


class FederationConfig(_Section):
    """Rounds, aggregation and what is shared between sites and the coordinator."""

    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="Overrides local_epochs when set.")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"] = (
        "fedavg"
    )
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal weight.")
    share: Literal["generators", "all"] = "generators"
    min_sites: int = Field(2, ge=1, description="A round needs at least this many valid updates.")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    round_timeout_s: float = Field(3600.0, gt=0.0)
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_update_norm: float | None = Field(None, gt=0.0)
    decay_rounds: int | None = Field(
        None,
        ge=0,
        description="Final rounds over which the sites' lr decays to 0 (default: the same "
        "fraction of rounds as training.decay_epochs is of training.epochs).",
    )
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="FedTrimmedAvg: cut per end.")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam/FedYogi server step size.")
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    server_tau: float = Field(1e-3, gt=0.0, description="FedAdam/FedYogi adaptivity.")
    validation_site: Path | None = Field(
        None, description="A site folder no hospital trains on: central paired evaluation."
    )
    initial_generators: AbsolutePath | None = Field(
        None,
        description="A fedsynth checkpoint whose generators round 1 starts from instead of "
        "random weights (train-local's on public data such as the phantom, or an earlier run's "
        "round); its model settings and image size must be the run's.",
    )
    warm_start: Literal["auto", "none", "phantom"] = Field(
        "auto",
        description="'phantom': before round 1 the coordinator trains the run's networks on the "
        "built-in phantom (public, no patient, exact pairs) for warm_start_steps and round 1 "
        "starts from those generators; cached by settings. Costs no privacy. 'auto': 'phantom' "
        "under DP-SGD (measured: 16.0 -> 22.8 dB at epsilon 8, BENCHMARKS.md) unless "
        "initial_generators is set, else 'none'.",
    )
    warm_start_steps: int = Field(
        600, ge=1, description="Steps of the phantom warm start (batches of training.batch_size)."
    )
    warm_start_cache: AbsolutePath | None = Field(
        None,
        description="Where warm starts are kept, by settings (default: a 'warm-starts' folder "
        "beside the run folder).",
    )
    warm_start_subjects: int = Field(
        16, ge=2, description="Phantom subjects the warm start trains on (two contrasts each)."
    )
    evaluate_sites: bool = Field(
        True,
        description="Ask sites to score each round's global model on their own validation data "
        "(data.validation_fraction); the coordinator keeps the best round by it (best.json).",
    )
    ema_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Keep an exponential moving average of the aggregated generators across "
        "rounds (ema = d * ema + (1 - d) * new, starting at round 1's aggregate), saved as a "
        "checkpoint in each round's ema/ folder; sites always train from the plain aggregate. "
        "None: off.",
    )
    start_sites: int | None = Field(
        None,
        ge=1,
        description="The first round waits until this many sites are online (default: "
        "min_sites); later rounds need min_sites.",
    )
    rejoin_grace_s: float = Field(
        60.0,
        ge=0.0,
        description="At a round's start, wait up to this long for sites that took part before "
        "and are offline (a restarting daemon) before going on without them.",
    )

    @model_validator(mode="after")
    def _check_rounds(self) -> Self:
        if self.warm_start == "phantom" and self.initial_generators is not None:
            raise ValueError(
                "set federation.warm_start or federation.initial_generators, not both (both "
                "choose round 1's starting generators)"
            )
        if self.decay_rounds is not None and self.decay_rounds > self.rounds:
            raise ValueError(
                f"decay_rounds ({self.decay_rounds}) cannot exceed rounds ({self.rounds})"
            )
        return self

    def round_lr_factor(self, round_number: int, training: TrainingConfig) -> float:
        """The sites' learning-rate factor in round ``round_number`` (1-based)."""
        decay = self.decay_rounds
        if decay is None:
            decay = round(self.rounds * training.decay_epochs / max(training.epochs, 1))
        from fedsynth.common.training.schedule import linear_decay

        return linear_decay(self.rounds, decay)(round_number - 1)


SplitScheme = Literal["auto", "counts", "ratios", "dirichlet", "power", "natural"]
Baseline = Literal["local", "pooled"]


def _all_baselines() -> list[Baseline]:
    return ["local", "pooled"]


class SimulationConfig(_Section):
    """A simulated consortium on one machine: how the pool is split, and the experiment run on it.

    The pool is the phantom (``num_sites`` scanners) unless ``fedsynth simulate --site`` names
    real site folders. Per-site settings take one value for every site or a list of
    ``num_sites`` values (see :mod:`fedsynth.simulations.partition`).
    """

    num_sites: int = Field(4, ge=1, le=1000)
    partition: SplitScheme = Field(
        "auto",
        description="How subjects are dealt to sites: 'counts' (subjects), 'ratios', 'dirichlet' "
        "(alpha), 'power' (power_exponent), 'natural' (each real site as it is); 'auto' is "
        "'counts' on the phantom and 'natural' on real sites.",
    )
    subjects: list[int] = Field(
        default_factory=lambda: [12, 6, 3, 1], description="Training subjects per site ('counts')."
    )
    total_subjects: int | None = Field(
        None, ge=1, description="Pool size for ratios/dirichlet/power (default: sum(subjects))."
    )
    ratios: list[float] | None = Field(None, description="Site shares for 'ratios'.")
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (small: unequal).")
    power_exponent: float = Field(1.0, ge=0.0, description="Site k gets a share ~ k^-exponent.")
    min_subjects: int = Field(1, ge=1, description="Fewest training subjects a site may get.")
    holdout_subjects: int = Field(
        1, ge=0, description="Paired test subjects per site, never trained on."
    )
    unpaired_fraction: float | list[float] = Field(
        0.5, description="Per site: share of training subjects that bring only one modality."
    )
    misalignment: Misalignment | list[Misalignment] | None = Field(
        None, description="Per site misalignment of domain B (default: data.misalignment)."
    )
    missing_domain: list[Literal["", "A", "B"]] | None = Field(
        None, description="Per site: a domain the site lacks entirely (it then cannot train)."
    )
    scanners: Literal["per-site", "shared"] = Field(
        "per-site", description="Phantom: every site its own scanner, or all sites site-1's."
    )
    phantom_voxel_mm: float = Field(1.0, gt=0.0, le=8.0)
    seed: int = 0
    baselines: list[Baseline] = Field(
        default_factory=_all_baselines,
        description="Baselines trained on the same split with the same compute.",
    )
    samples: bool = Field(True, description="Save a sample slice per site for the report.")
    engine: Literal["flower", "inprocess"] = Field(
        "flower",
        description="The federated phase: 'flower' (Flower's simulation engine on Ray, the same "
        "processes as a deployment) or 'inprocess' (the same Coordinator and ClientApp code in "
        "this process, sites one after another: no Flower processes, for quick tests).",
    )
    cpus_per_site: int = Field(1, ge=1, description="Ray: CPU cores reserved per site.")
    gpus_per_site: float = Field(
        0.0, ge=0.0, le=1.0, description="Ray: GPU share per site (0.25: four sites per GPU)."
    )
    ray_address: str | None = Field(
        None, description="Attach to this Ray cluster (e.g. 'auto' or 'ray://host:10001')."
    )
    grid: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict,
        description="Experiment grid: axis -> {cell label -> config overrides}; every "
        "combination of one label per axis is run (`fedsynth simulate --grid`).",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.partition in ("auto", "counts") and len(self.subjects) != self.num_sites:
            raise ValueError(
                f"subjects lists {len(self.subjects)} sites but num_sites is {self.num_sites}"
            )
        if any(n < 1 for n in self.subjects):
            raise ValueError(f"every site needs at least one subject, found {self.subjects}")
        for name in ("unpaired_fraction", "misalignment", "missing_domain", "ratios"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_sites:
                raise ValueError(
                    f"{name} lists {len(value)} sites but num_sites is {self.num_sites}"
                )
        fractions = self.unpaired_fraction
        for fraction in fractions if isinstance(fractions, list) else [fractions]:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"unpaired_fraction must be in [0, 1], found {fraction}")
        if self.partition == "ratios" and self.ratios is None:
            raise ValueError("partition = 'ratios' needs simulation.ratios")
        for axis, cells in self.grid.items():
            if not cells:
                raise ValueError(f"grid axis {axis!r} has no cells")
        return self


class RunConfig(_Section):
    """Everything a run needs; written beside its outputs as ``config.resolved.toml``."""

    name: str = Field("fedsynth", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    preset: str | None = None
    output_dir: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_privacy(self) -> Self:
        if self.privacy.site_level and self.federation.strategy in ("fedmedian", "fedtrimmedavg"):
            raise ValueError(
                "privacy.level = 'site' adds noise to a mean of clipped updates; "
                f"federation.strategy = {self.federation.strategy!r} is not a mean (use fedavg, "
                "fedprox, fedadam or fedyogi)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def phantom_warm_start(self) -> bool:
        """Whether round 1 starts from the phantom warm start (``federation.warm_start``)."""
        fed = self.federation
        if fed.warm_start == "auto":
            return self.privacy.dp_sgd and fed.initial_generators is None
        return fed.warm_start == "phantom"

    @property
    def site_lr(self) -> float:
        """The sites' learning rate: ``privacy.lr`` under DP-SGD when set, else ``training.lr``."""
        if self.privacy.dp_sgd and self.privacy.lr is not None:
            return self.privacy.lr
        return self.training.lr

    @property
    def registration_enabled(self) -> bool:
        """Whether R and the correction loss are trained (``training.registration``)."""
        if self.training.registration == "auto":
            return self.data.misalignment != "none"
        return self.training.registration == "on"

    @property
    def sources(self) -> dict[str, str]:
        """Dotted key -> where its value came from, for every value not left at its default."""
        return dict(self._sources)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    """One invalid value: where it is, what was found, where it came from, what is allowed."""

    key: str
    found: Any
    allowed: str
    source: str | None = None

    def __str__(self) -> str:
        origin = f" (from {self.source})" if self.source else ""
        return f"{self.key} = {self.found!r}{origin}: {self.allowed}"


class ConfigError(ValueError):
    """Raised for an invalid configuration; lists every problem, one per line."""

    def __init__(self, issues: Sequence[ConfigIssue], context: str = "invalid configuration"):
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"{context}:\n{lines}")


# --------------------------------------------------------------------------- layering


def available_presets() -> list[str]:
    """Names of the presets shipped with fedsynth."""
    folder = resources.files("fedsynth.common") / "presets"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """The overrides a preset applies (a nested dict)."""
    if name not in available_presets():
        raise ConfigError(
            [
                ConfigIssue(
                    "preset", name, f"unknown preset; allowed: {', '.join(available_presets())}"
                )
            ]
        )
    text = (resources.files("fedsynth.common") / "presets" / f"{name}.toml").read_text(
        encoding="utf-8"
    )
    return tomllib.loads(text)


def parse_value(text: str) -> Any:
    """Interpret a CLI or environment string as a TOML value, falling back to the raw string.

    ``"1e-4"`` -> 0.0001, ``"true"`` -> True, ``"[2, 2, 2]"`` -> [2, 2, 2],
    ``"cuda:1"`` -> "cuda:1".
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([ConfigIssue(dotted, value, f"'{part}' is a value, not a section")])
        node = child
    node[parts[-1]] = value


class _Layers:
    """Merges nested dicts while remembering, per dotted key, which layer set it."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def add(self, tree: Mapping[str, Any], source: str) -> None:
        for dotted, value in _flatten(tree):
            _set_dotted(self.tree, dotted, value)
            self.sources[dotted] = source


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("--config", str(path), "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("--config", str(path), f"not valid TOML: {exc}")]) from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``FEDSYNTH_TRAINING__LR=1e-4`` -> ``{"training.lr": ("FEDSYNTH_TRAINING__LR", 1e-4)}``.

    ``FEDSYNTH_CONFIG`` and ``FEDSYNTH_PRESET`` are handled by :func:`load_config` itself.
    """
    found: dict[str, tuple[str, Any]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ("FEDSYNTH_CONFIG", "FEDSYNTH_PRESET"):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTED, ".")
        found[dotted] = (name, parse_value(text))
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``section.field=value`` override."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([ConfigIssue("--set", text, "expected section.field=value")])
    return key.strip(), parse_value(value.strip())


def _allowed_fields(loc: Sequence[str | int]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(error["loc"])
        return "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def validate_layers(tree: Mapping[str, Any], sources: Mapping[str, str]) -> RunConfig:
    """Validate a merged tree, turning pydantic errors into a :class:`ConfigError`."""
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        issues = []
        for error in exc.errors():
            dotted = ".".join(str(p) for p in error["loc"]) or "<root>"
            # A model-level check reports the section; point at the section's keys' sources.
            source = sources.get(dotted) or next(
                (src for key, src in sources.items() if key.startswith(f"{dotted}.")), None
            )
            issues.append(ConfigIssue(dotted, error.get("input"), _describe(error), source))
        raise ConfigError(issues) from None
    config._sources = dict(sources)
    return config


def load_config(
    path: Path | None = None,
    *,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Build a run's configuration from defaults, preset, TOML file, environment and CLI.

    Args:
        path: A TOML file (``[data]``, ``[training]``, ... tables). ``FEDSYNTH_CONFIG`` is used
            when not given.
        preset: A preset name; beats a preset named in the file and ``FEDSYNTH_PRESET``.
        overrides: ``section.field=value`` strings (``--set``), applied last.
        environ: Environment to read ``FEDSYNTH_*`` from (default: ``os.environ``).

    Returns:
        The validated configuration; ``config.sources`` says where each non-default value came from.

    Raises:
        ConfigError: with every invalid value's dotted name, the value found, its origin and what
            is allowed.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get("FEDSYNTH_CONFIG"):
        path = Path(environ["FEDSYNTH_CONFIG"])
    file_tree = _read_toml(path) if path is not None else {}

    chosen = preset or environ.get("FEDSYNTH_PRESET") or file_tree.get("preset")
    layers = _Layers()
    if chosen is not None:
        if not isinstance(chosen, str):
            raise ConfigError([ConfigIssue("preset", chosen, "must be a preset name (a string)")])
        layers.add(load_preset(chosen), f"preset {chosen}")
    if file_tree:
        layers.add(file_tree, f"file {path}")
    for dotted, (name, value) in env_overrides(environ).items():
        _set_dotted(layers.tree, dotted, value)
        layers.sources[dotted] = f"env {name}"
    for text in overrides:
        dotted, value = parse_override(text)
        _set_dotted(layers.tree, dotted, value)
        layers.sources[dotted] = f"--set {text}"
    if chosen is not None:
        layers.tree["preset"] = chosen
        layers.sources["preset"] = (
            "--preset"
            if preset
            else ("env FEDSYNTH_PRESET" if environ.get("FEDSYNTH_PRESET") else f"file {path}")
        )
    return validate_layers(layers.tree, layers.sources)


# --------------------------------------------------------------------------- writing


def _toml_ready(value: Any) -> Any:
    """Drop ``None`` (TOML has no null: an absent key means the default) and stringify paths."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_differences(config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value, default) for every value that differs from the field defaults."""
    current = dict(_flatten(config.model_dump(mode="json")))
    default = dict(_flatten(RunConfig().model_dump(mode="json")))
    return {k: (v, default.get(k)) for k, v in current.items() if v != default.get(k)}


def dumps_config(config: RunConfig) -> str:
    """The configuration as TOML, headed by comments naming every non-default value's origin."""
    header = ["# fedsynth resolved configuration: load it with `--config` to repeat this run."]
    differences = config_differences(config)
    if differences:
        header.append("# Differs from the defaults:")
        for key, (value, default) in differences.items():
            origin = config.sources.get(key, "derived")
            header.append(f"#   {key} = {value!r} (default {default!r}; {origin})")
    body = tomli_w.dumps(_toml_ready(config.model_dump(mode="json")))
    return "\n".join(header) + "\n\n" + body


def write_resolved_config(config: RunConfig, out_dir: Path) -> Path:
    """Write ``config.resolved.toml`` into ``out_dir`` (atomically) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / RESOLVED_CONFIG_NAME
    atomic_write_text(target, dumps_config(config))
    return target


def loads_config(text: str, source: str) -> RunConfig:
    """Validate a resolved configuration received as TOML text (e.g. from the coordinator)."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("<root>", None, f"not valid TOML: {exc}", source)]) from None
    return validate_layers(tree, dict.fromkeys(dict(_flatten(tree)), source))
