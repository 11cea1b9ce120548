"""The sections one site trains by: data, model, local training and differential privacy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from fedsynth.common.config.values import DeviceStr, DirectionStr, Misalignment, Section


class DataConfig(Section):
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


class ModelConfig(Section):
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


class TrainingConfig(Section):
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


class PrivacyConfig(Section):
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
