"""The sections of a whole run: federation, simulation, and :class:`RunConfig` holding them all."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, PrivateAttr, model_validator

from fedsynth.common.config.site import DataConfig, ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.config.values import AbsolutePath, Misalignment, Section


class FederationConfig(Section):
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


class SimulationConfig(Section):
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


class RunConfig(Section):
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
