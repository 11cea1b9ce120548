"""One hospital's part of a federated round, independent of how messages travel.

:class:`RoundInstruction` is what the coordinator asks for (round number, learning rate, local
epochs or steps, the FedProx weight, what to share, the wire precision, and the coordinator's
resolved configuration). :class:`SiteSettings` is what only the hospital decides: where its data is,
which device to use, where to keep its state. :func:`train_round` restores the site's own networks
and optimisers (never sent anywhere), loads the global generators, trains and returns the update of
the shared networks (trained minus received) and scalar metrics. Both hold out the same validation
part of the site's weakly paired data (:func:`fedsynth.common.data.validation.hold_out`,
``data.validation_fraction``, seeded by ``training.seed``): :func:`train_round` trains on the rest,
and :func:`evaluate_round` scores the global generators on that part only, so the coordinator can
choose a round without looking at any test site.

A site keeps one state file per round it trained (the last three), so that a coordinator that
crashed mid-round and resumed from the previous round finds the state that round started from: a
resumed run then ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from fedsynth.client.local import slices_translator
from fedsynth.common.config import RunConfig
from fedsynth.common.data.datasets import TrainingSlices, training_set
from fedsynth.common.data.errors import BadScansError, EmptySiteError, MissingModalityError
from fedsynth.common.data.misalign import SEVERITIES as MISALIGNMENT_LEVELS
from fedsynth.common.data.site import SiteData, load_site
from fedsynth.common.data.validation import hold_out, validation_pairs
from fedsynth.common.evaluation import evaluate_pairs
from fedsynth.common.io import atomic_path
from fedsynth.common.messages import (
    EVALUATE_METRICS,
    SHARED_NETS,
    RoundInstruction,
    flatten,
    unflatten,
    update_from,
)
from fedsynth.common.privacy.accounting import patient_epsilon
from fedsynth.common.privacy.plan import BudgetSpentError, check_budget, plan_noise
from fedsynth.common.privacy.sampling import population_unit, private_loader, private_population
from fedsynth.common.privacy.site_level import clip_update
from fedsynth.common.training.trainer import CycleGANTrainer

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # a line in the hospital's log while a round trains

KEEP_STATES = 3
FAULTS = ("nan", "shape")


class SiteError(Exception):
    """A site cannot take part in this round. ``str(error)`` is safe to send to the coordinator:
    it names no path, file or subject (the site's own log has those)."""


@dataclass(frozen=True)
class SiteSettings:
    """What the hospital decides for itself (SuperNode ``--node-config``).

    Attributes:
        data_dir: the site's BIDS (or per-modality) folder.
        device: ``cuda:0``, ``cpu`` or ``auto``; overrides the coordinator's ``training.device``.
        state_dir: where the site's own networks, optimisers and RNG states live between rounds
            (``None``: in the Flower context, simulation only).
        cache_dir: preprocessed-slice cache (default ``state_dir/cache``).
        fault: testing only, ``nan`` or ``shape``: corrupt the update to exercise the
            coordinator's checks.
        partition_id: simulation only, the index of this site in the run's site list.
        max_epsilon: the hospital's own privacy cap (``--max-epsilon``): it trains only under
            DP-SGD at the site (patient or slice level) and never past this epsilon, whatever
            the coordinator's config says.
        misalignment: simulation only, this simulated site's misalignment of domain B (run
            config ``site-misalignment``, one level per site), in place of the coordinator's.
        threads: simulation only, torch threads for this site (its Ray CPU share).
        skip_bad: the hospital's own ``--skip-bad``: train without its unusable scans, whatever
            the coordinator's ``data.skip_bad``.
    """

    data_dir: Path
    device: str | None = None
    state_dir: Path | None = None
    cache_dir: Path | None = None
    fault: str | None = None
    partition_id: int | None = None
    max_epsilon: float | None = None
    misalignment: str | None = None
    threads: int | None = None
    skip_bad: bool = False

    @classmethod
    def from_configs(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> SiteSettings:
        """Read the node config (deployment) or pick this partition's site (simulation)."""

        def text(key: str, source: Mapping[str, Any] = node_config) -> str | None:
            value = source.get(key)
            return str(value) if value not in (None, "") else None

        partition = node_config.get("partition-id")
        if text("data-dir") is not None:
            data_dir = Path(str(text("data-dir")))
        elif partition is not None and text("site-dirs", run_config):
            sites = [s for s in str(run_config["site-dirs"]).split(",") if s]
            if not 0 <= int(partition) < len(sites):
                raise SiteError(f"partition {partition} has no site ({len(sites)} listed)")
            data_dir = Path(sites[int(partition)])
        else:
            raise SiteError("this node has no data-dir in its node config")
        state = text("state-dir")
        if state is None and partition is not None and text("state-root", run_config):
            state = str(Path(str(run_config["state-root"])) / f"site-{int(partition)}")
        fault = text("fault")
        if fault is not None and fault not in FAULTS:
            raise SiteError(f"node config fault={fault!r}: expected one of {', '.join(FAULTS)}")
        cache = text("cache-dir") or text("cache-dir", run_config)
        misalignment = threads = None
        if partition is not None and text("site-misalignment", run_config):
            levels = str(run_config["site-misalignment"]).split(",")
            misalignment = levels[int(partition)] if int(partition) < len(levels) else None
            if misalignment not in (None, *MISALIGNMENT_LEVELS):
                raise SiteError(f"site-misalignment {misalignment!r}: not a misalignment level")
        if partition is not None and int(run_config.get("cpus-per-site") or 0) > 0:
            threads = int(run_config["cpus-per-site"])
        cap = text("max-epsilon")
        try:
            max_epsilon = float(cap) if cap is not None else None
        except ValueError:
            raise SiteError(f"node config max-epsilon={cap!r}: expected a number") from None
        return cls(
            data_dir=data_dir,
            device=text("device"),
            state_dir=Path(state) if state else None,
            cache_dir=Path(cache) if cache else (Path(state) / "cache" if state else None),
            fault=fault,
            partition_id=int(partition) if partition is not None else None,
            max_epsilon=max_epsilon,
            misalignment=misalignment,
            threads=threads,
            skip_bad=str(node_config.get("skip-bad", "")).lower() in ("1", "true", "yes"),
        )


class StateStore(Protocol):
    """Where a site keeps its trainer state between rounds (bytes written by ``torch.save``)."""

    def load(self, run_key: str, before_round: int) -> bytes | None: ...

    def save(self, run_key: str, round_number: int, blob: bytes) -> None: ...


class DiskStore:
    """``<state_dir>/<run_key>/state-round-NNNN.pt``, written atomically, the last few kept."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _files(self, run_key: str) -> dict[int, Path]:
        folder = self.root / run_key
        found = {}
        for path in folder.glob("state-round-*.pt"):
            suffix = path.stem.rsplit("-", 1)[-1]
            if suffix.isdigit():
                found[int(suffix)] = path
        return found

    def load(self, run_key: str, before_round: int) -> bytes | None:
        earlier = {r: p for r, p in self._files(run_key).items() if r < before_round}
        return earlier[max(earlier)].read_bytes() if earlier else None

    def save(self, run_key: str, round_number: int, blob: bytes) -> None:
        folder = self.root / run_key
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"state-round-{round_number:04d}.pt") as tmp:
            Path(tmp).write_bytes(blob)
        for number, path in sorted(self._files(run_key).items())[:-KEEP_STATES]:
            path.unlink(missing_ok=True)
            logger.debug("dropped old state of round %d", number)


class MemoryStore:
    """A dict of bytes (the Flower ``context.state`` of a simulated node wraps one)."""

    def __init__(self, blobs: dict[str, bytes] | None = None):
        self.blobs: dict[str, bytes] = {} if blobs is None else blobs

    def load(self, run_key: str, before_round: int) -> bytes | None:
        rounds = [
            int(k.rsplit("-", 1)[-1])
            for k in self.blobs
            if k.startswith(f"{run_key}/round-") and int(k.rsplit("-", 1)[-1]) < before_round
        ]
        return self.blobs[f"{run_key}/round-{max(rounds)}"] if rounds else None

    def save(self, run_key: str, round_number: int, blob: bytes) -> None:
        self.blobs[f"{run_key}/round-{round_number}"] = blob
        mine = sorted(
            (int(k.rsplit("-", 1)[-1]), k) for k in self.blobs if k.startswith(f"{run_key}/")
        )
        for _, key in mine[:-KEEP_STATES]:
            del self.blobs[key]


def _load_site(settings: SiteSettings, config: RunConfig) -> SiteData:
    data = config.data
    if settings.skip_bad and not data.skip_bad:
        data = data.model_copy(update={"skip_bad": True})
    try:
        return load_site(
            settings.data_dir, data, cache_dir=settings.cache_dir, seed=config.training.seed
        )
    except EmptySiteError as exc:
        logger.error("site data: %s", exc)
        raise SiteError("no scans found in the site's data folder") from None
    except MissingModalityError as exc:
        logger.error("site data: %s", exc)
        raise SiteError(
            f"no usable scans for {config.data.direction}: a modality is missing or all of its "
            "scans are unusable (the site's log names them)"
        ) from None
    except BadScansError as exc:
        logger.error("site data: %s", exc)
        raise SiteError(
            f"{exc.summary} (the site's log names them; the hospital can fix them or start its "
            "daemon with --skip-bad)"
        ) from None


def _split_site(settings: SiteSettings, config: RunConfig) -> SiteData:
    """The site with its validation part held out (the same split every round and message)."""
    return hold_out(
        _load_site(settings, config), config.data.validation_fraction, config.training.seed
    )


def _trainer(settings: SiteSettings, config: RunConfig) -> CycleGANTrainer:
    return CycleGANTrainer(
        config.model,
        config.training,
        config.data.image_size,
        registration=config.registration_enabled,
        device=settings.device,
        privacy=config.privacy,
    )


def _load_global(
    trainer: CycleGANTrainer, global_state: Mapping[str, torch.Tensor], share: str
) -> None:
    nets = unflatten(global_state)
    expected = set(SHARED_NETS[share])
    if set(nets) != expected:
        raise SiteError(
            f"the coordinator sent networks {sorted(nets)}, expected {sorted(expected)}"
        )
    for name, state in nets.items():
        target = trainer.nets[name]
        target = getattr(target, "_module", target)
        target.load_state_dict({k: v.to(trainer.device) for k, v in state.items()})


def _loader_seed(config: RunConfig, round_number: int, epoch: int) -> int:
    return config.training.seed * 100_003 + round_number * 1_009 + epoch


def _loader(
    dataset: TrainingSlices, config: RunConfig, round_number: int, epoch: int
) -> DataLoader:
    batch = config.training.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(_loader_seed(config, round_number, epoch)),
        num_workers=config.training.num_workers,
        drop_last=len(dataset) > batch,
    )


def _corrupt(state: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    if fault == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = math.nan
    else:
        state[key] = state[key][..., :-1].clone()
    logger.warning("fault injection (%s) on %s: this update will be refused", fault, key)
    return state


def train_round(
    settings: SiteSettings,
    instruction: RoundInstruction,
    global_state: Mapping[str, torch.Tensor],
    store: StateStore,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train this site for one round; return the shared networks' update (flat) and metrics."""
    start = time.perf_counter()
    config = instruction.config()
    if settings.max_epsilon is not None and not config.privacy.dp_sgd:
        raise BudgetSpentError(
            f"this hospital trains only under DP-SGD at the site (its cap is epsilon "
            f"{settings.max_epsilon:g}); the coordinator's configuration has "
            + ("privacy off" if not config.privacy.enabled else "privacy.level = 'site'")
        )
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    site = _split_site(settings, config)  # train on the training part only
    dataset = training_set(
        [site],
        misalignment=settings.misalignment or config.data.misalignment,
        augment_gamma=config.data.augment_gamma,
        seed=config.training.seed,
    )
    trainer = _trainer(settings, config)
    logger.info(
        "round %d: training %s on %d weakly paired and %d unpaired examples, %s, lr %.2g, on %s",
        instruction.round,
        config.data.direction,
        dataset.paired_count,
        dataset.unpaired_count,
        f"{instruction.local_steps} steps"
        if instruction.local_steps
        else f"{instruction.local_epochs} local epoch(s)",
        instruction.lr,
        trainer.device,
    )
    blob = store.load(instruction.run_key, instruction.round)
    state = (
        None
        if blob is None
        else torch.load(io.BytesIO(blob), map_location=trainer.device, weights_only=True)
    )
    plan = None
    population = private_population(dataset, config.privacy)
    if config.privacy.dp_sgd:
        # The noise is fixed before round 1 and kept: recalibrating later would change the plan
        # the budget was set for.
        unit = population_unit(config.privacy)
        if len(population) == 0:
            raise SiteError(
                "patient-level differential privacy trains on patients with both modalities "
                "and this site has none in its training part"
            )
        plan = CycleGANTrainer.saved_plan(state) or plan_noise(
            config.privacy,
            examples=len(population),
            batch_size=config.privacy.batch_size or config.training.batch_size,
            networks=len(trainer.trained_names),
            steps_per_round=instruction.local_steps or None,
            epochs_per_round=instruction.local_epochs,
            rounds=config.federation.rounds,
            unit=unit,
        )
        if plan.unit != unit:
            raise SiteError(
                f"this site's saved privacy state samples {plan.unit}s and the run now asks "
                f"for privacy.level = {config.privacy.level!r}: the unit cannot change in a run"
            )
        if plan.examples != len(population):
            logger.warning(
                "the site now has %d training %ss, its noise plan was made for %d: the "
                "sample rate stays %.5f (the guarantee holds; batches are larger or smaller)",
                len(population),
                unit,
                plan.examples,
                plan.sample_rate,
            )
        trainer.make_private(plan)
    if state is not None:
        trainer.load_state_dict(state)
    if plan is not None:
        assert trainer.accountant is not None
        caps = [c for c in (config.privacy.budget_epsilon, settings.max_epsilon) if c is not None]
        check_budget(trainer.accountant, plan, min(caps) if caps else None)
    _load_global(trainer, global_state, instruction.share)
    trainer.set_lr(instruction.lr)
    trainer.set_proximal(instruction.proximal_mu)

    sums: dict[str, float] = {}
    steps = samples = 0
    epoch = 0
    budget = instruction.local_steps or None
    while True:
        if budget is None and epoch >= instruction.local_epochs:
            break
        if budget is not None and steps >= budget:
            break
        trainer.epoch = (instruction.round - 1) * max(instruction.local_epochs, 1) + epoch
        loader = (
            _loader(dataset, config, instruction.round, epoch)
            if plan is None
            else private_loader(
                population,
                plan,
                seed=_loader_seed(config, instruction.round, epoch),
                epoch=trainer.epoch,
                num_workers=config.training.num_workers,
            )
        )
        summary = trainer.train_epoch(
            loader,
            max_steps=None if budget is None else budget - steps,
            report=functools.partial(_report_progress, instruction.round, epoch, budget, steps),
            report_every_s=PROGRESS_EVERY_S,
        )
        done = int(summary["steps"])
        for key, value in summary.items():
            if key.startswith("loss_"):
                sums[key] = sums.get(key, 0.0) + value * done
        steps += done
        samples += int(summary["samples"])
        epoch += 1
        if done == 0:
            raise SiteError("the site's data yields no training batch")
    trainer.epoch = instruction.round * max(instruction.local_epochs, 1)

    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    store.save(instruction.run_key, instruction.round, buffer.getvalue())

    trained = flatten(trainer.nets, SHARED_NETS[instruction.share])
    shared = update_from(trained, global_state)
    if config.privacy.site_level:
        shared = clip_update(shared, config.privacy.site_clip_norm)
    if settings.fault is not None:
        shared = _corrupt(shared, settings.fault)
    seconds = time.perf_counter() - start
    # Under DP the training losses stay home: they are computed from the examples without noise,
    # so the guarantee would not cover them. Counts, timings and epsilon remain.
    metrics = {} if config.privacy.enabled else {key: value / steps for key, value in sums.items()}
    metrics.update(
        {
            "num-examples": float(samples),
            "steps": float(steps),
            "seconds": seconds,
            "samples-per-s": samples / seconds if seconds > 0 else 0.0,
            "lr": instruction.lr,
        }
    )
    if plan is not None:
        assert trainer.accountant is not None
        metrics["epsilon"] = trainer.epsilon()
        metrics["delta"] = config.privacy.delta
        if plan.unit == "patient":
            logger.info(
                "round %d: patient-level epsilon %.3f at delta %g after %d DP steps over %d "
                "patients (sigma %.3f per network x %d networks, q %.5f)",
                instruction.round,
                metrics["epsilon"],
                config.privacy.delta,
                trainer.accountant.steps,
                plan.examples,
                plan.noise_multiplier,
                plan.networks,
                plan.sample_rate,
            )
        else:
            group = dataset.max_examples_per_subject()
            logger.info(
                "round %d: slice-level epsilon %.3f at delta %g after %d DP steps (sigma %.3f, "
                "q %.5f); a whole patient (up to %d examples): epsilon %.1f (group privacy, "
                "stays at this site)",
                instruction.round,
                metrics["epsilon"],
                config.privacy.delta,
                trainer.accountant.steps,
                plan.noise_multiplier,
                plan.sample_rate,
                group,
                patient_epsilon(plan, trainer.accountant.steps, group, config.privacy.delta),
            )
    if settings.partition_id is not None:
        metrics["partition-id"] = float(settings.partition_id)
    logger.info(
        "round %d: %d steps, %d samples in %.1f s (G %.4f, cycle %.4f)",
        instruction.round,
        steps,
        samples,
        seconds,
        sums.get("loss_g", math.nan) / max(steps, 1),  # the site's own log keeps the losses
        sums.get("loss_cycle", math.nan) / max(steps, 1),
    )
    return shared, metrics


def _report_progress(
    round_number: int,
    epoch: int,
    budget: int | None,
    done_before: int,
    steps: int,
    total: int | None,
    rate: float,
    losses: Mapping[str, float],
) -> None:
    """One line of a round's progress for the hospital's log (there is no terminal to draw on)."""
    if budget is not None:
        where = f"step {done_before + steps}/{budget}"
    else:
        where = f"epoch {epoch + 1}, step {steps}" + (f"/{total}" if total else "")
    logger.info(
        "round %d: %s, %.1f samples/s, G %.3f",
        round_number,
        where,
        rate,
        losses.get("loss_g", math.nan),
    )


def evaluate_round(
    settings: SiteSettings,
    instruction: RoundInstruction,
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Paired evaluation of the global generators on this site's validation part only.

    ``num-examples`` is the number of validation slice positions scored (the coordinator's
    weight); the metrics are means over the validation sessions, as :func:`evaluate_pairs` gives.
    """
    start = time.perf_counter()
    config = instruction.config()
    site = _split_site(settings, config)
    if not site.paired and not site.validation:
        logger.info("no paired subjects at this site: nothing to evaluate")
        raise SiteError("no subject with both modalities: nothing to evaluate")
    pairs = validation_pairs(site)
    if not pairs:
        logger.info(
            "no validation data held out (data.validation_fraction = %g): nothing to evaluate",
            config.data.validation_fraction,
        )
        raise SiteError("no validation data held out at this site: nothing to evaluate")
    name = site.name
    trainer = _trainer(settings, config)
    _load_global(trainer, global_state, instruction.share)
    translate = slices_translator(trainer, config)
    report = evaluate_pairs(name, config.data.direction, pairs, translate)
    metrics = {k: float(v) for k, v in report.mean.items() if k in EVALUATE_METRICS}
    metrics["num-subjects"] = float(len(report.subjects))
    metrics["num-examples"] = float(sum(s.slices for s in report.subjects))
    metrics["seconds"] = time.perf_counter() - start
    if settings.partition_id is not None:
        metrics["partition-id"] = float(settings.partition_id)
    return metrics
