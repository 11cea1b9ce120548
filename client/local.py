"""Training without federation: one site (local-only baseline) or several pooled (centralized).

Both baselines use the very trainer the federated client uses, on the same preprocessing, so
their numbers are comparable with a federated run's. A run folder holds the resolved config,
``metrics.jsonl`` (one line per epoch), the resumable trainer state, the checkpoint (rewritten
after every epoch, atomically) and, when the sites have paired subjects, ``evaluation.json``.

With ``privacy.level = "example"`` the run is DP-SGD (:mod:`client.privacy`) with the noise
planned for ``training.epochs`` epochs; each epoch's line and the checkpoint carry the cumulative
epsilon, and training stops early, with a warning, at the epoch that would pass
``privacy.budget_epsilon``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.privacy import (
    BudgetSpentError,
    NoisePlan,
    check_budget,
    group_size,
    patient_epsilon,
    plan_noise,
    poisson_loader,
)
from client.trainer import CycleGANTrainer
from common.checkpoint import CheckpointMetadata, OutputScale, save_checkpoint
from common.config import RunConfig, write_resolved_config
from common.data.datasets import UnpairedSlices
from common.data.site import SiteData, Volume, load_site
from common.evaluation import EvaluationReport, evaluate_pairs, site_pairs

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class LocalRun:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, float]]
    evaluations: list[EvaluationReport]


def output_scale(volumes: Sequence[Volume]) -> OutputScale:
    """Typical target-domain intensity range: the mean of the volumes' mappings."""
    kinds = {v.stack.mapping.kind for v in volumes}
    kind = "window" if kinds == {"window"} else "percentile"
    low = float(np.mean([v.stack.mapping.low for v in volumes]))
    high = float(np.mean([v.stack.mapping.high for v in volumes]))
    return OutputScale(low=low, high=high, kind=kind)


def make_loader(dataset: UnpairedSlices, config: RunConfig, epoch: int) -> DataLoader:
    """A loader whose shuffle depends only on (seed, epoch): resumed runs see the same order."""
    generator = torch.Generator().manual_seed(config.training.seed * 100_003 + epoch)
    batch = config.training.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=generator,
        num_workers=config.training.num_workers,
        drop_last=len(dataset) > batch,
    )


def load_sites(site_dirs: Sequence[Path], config: RunConfig, cache_dir: Path) -> list[SiteData]:
    return [
        load_site(Path(d), config.data, cache_dir=cache_dir, seed=config.training.seed)
        for d in site_dirs
    ]


def train_local(
    site_dirs: Sequence[Path],
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = False,
    evaluate: bool = True,
    site_misalignment: Sequence[str] | None = None,
) -> LocalRun:
    """Train on one site or on several pooled; write everything into ``config.run_dir``.

    ``site_misalignment`` (simulation): one misalignment level per site, in place of
    ``config.data.misalignment`` (pooled sites that are misaligned differently).
    """
    if not site_dirs:
        raise ValueError("train-local needs at least one --site")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir)
    cache_dir = config.data.cache_dir or run_dir / "cache"
    sites = load_sites(site_dirs, config, cache_dir)
    domain_a = [v for s in sites for v in s.domain_a]
    domain_b = [v for s in sites for v in s.domain_b]
    misalignment: str | list[str] = config.data.misalignment
    if site_misalignment is not None:
        if len(site_misalignment) != len(sites):
            raise ValueError(f"{len(site_misalignment)} misalignment levels for {len(sites)} sites")
        misalignment = [
            m for s, m in zip(sites, site_misalignment, strict=True) for _ in s.domain_b
        ]
    dataset = UnpairedSlices(
        domain_a, domain_b, misalignment=misalignment, seed=config.training.seed
    )
    logger.info(
        "%s: %d A slices, %d B slices from %d site(s)",
        config.data.direction,
        len(dataset.a),
        len(dataset.b),
        len(sites),
    )

    trainer = CycleGANTrainer(
        config.model,
        config.training,
        config.data.image_size,
        registration=config.registration_enabled,
        privacy=config.privacy,
    )
    state_path = run_dir / STATE_NAME
    state = (
        torch.load(state_path, map_location=trainer.device, weights_only=True)
        if resume and state_path.exists()
        else None
    )
    plan = None
    if config.privacy.example_level:
        plan = CycleGANTrainer.saved_plan(state) or plan_noise(
            config.privacy,
            examples=len(dataset),
            batch_size=config.training.batch_size,
            networks=len(trainer.nets),
            steps_per_round=None,
            epochs_per_round=1,
            rounds=config.training.epochs,
        )
        trainer.make_private(plan)
    elif config.privacy.site_level:
        raise ValueError(
            "privacy.level = 'site' protects a site's contribution to a federation; a local or "
            "pooled run has none: use privacy.level = 'example'"
        )
    if state is not None:
        trainer.load_state_dict(state)
        logger.info("resumed %s at epoch %d (step %d)", run_dir, trainer.epoch, trainer.step)

    kind = "local" if len(sites) == 1 else "pooled"
    metadata = CheckpointMetadata(
        kind=kind,
        direction=config.data.direction,
        model=config.model,
        data=config.data,
        output_scale=output_scale(domain_b),
        sites=[s.name for s in sites],
    )
    checkpoint = run_dir / CHECKPOINT_DIR
    history: list[dict[str, float]] = []
    while trainer.epoch < config.training.epochs:
        if plan is None:
            loader = make_loader(dataset, config, trainer.epoch)
        else:
            assert trainer.accountant is not None
            try:
                check_budget(trainer.accountant, plan, config.privacy.budget_epsilon)
            except BudgetSpentError as exc:
                logger.warning("stopping after epoch %d: %s", trainer.epoch, exc)
                break
            loader = poisson_loader(
                dataset,
                plan,
                seed=config.training.seed * 100_003 + trainer.epoch,
                num_workers=config.training.num_workers,
            )
        history += trainer.fit(loader, 1, progress=progress)
        if plan is not None:
            history[-1].update(epsilon=trainer.epsilon(), delta=config.privacy.delta)
        _append_jsonl(run_dir / "metrics.jsonl", history[-1])
        trainer.save_state(state_path)
        metadata.epoch, metadata.step = trainer.epoch, trainer.step
        metadata.metrics = {k: v for k, v in history[-1].items() if k.startswith("loss_")}
        if plan is not None:
            metadata.privacy = _privacy_record(trainer, plan, config, domain_a, domain_b)
        save_checkpoint(checkpoint, trainer.generators(), metadata)

    evaluations: list[EvaluationReport] = []
    if evaluate:
        for site_dir in site_dirs:
            try:
                name, pairs = site_pairs(Path(site_dir), config.data, cache_dir)
            except ValueError as exc:
                logger.info("no paired evaluation: %s", exc)
                continue

            def translate(
                slices: np.ndarray, chunk: int = 4 * config.training.batch_size
            ) -> np.ndarray:
                parts = [
                    trainer.translate(torch.from_numpy(slices[i : i + chunk])[:, None])[:, 0]
                    for i in range(0, len(slices), chunk)
                ]
                return torch.cat(parts).numpy()

            report = evaluate_pairs(name, config.data.direction, pairs, translate)
            report.write(run_dir / f"evaluation-{name}.json")
            evaluations.append(report)
        if evaluations:
            metadata.metrics.update(
                {f"{r.site}/{k}": v for r in evaluations for k, v in r.mean.items()}
            )
            save_checkpoint(checkpoint, trainer.generators(), metadata)
    return LocalRun(run_dir, checkpoint, history, evaluations)


def _append_jsonl(path: Path, values: dict[str, float]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(values, sort_keys=True) + "\n")


def _privacy_record(
    trainer: CycleGANTrainer,
    plan: NoisePlan,
    config: RunConfig,
    domain_a: Sequence[Volume],
    domain_b: Sequence[Volume],
) -> dict[str, float | int | str]:
    """What a local DP run spent, for its checkpoint (a pooled run is one data holder)."""
    assert trainer.accountant is not None
    group = group_size(domain_a, domain_b)
    steps = trainer.accountant.steps
    return {
        "level": "example",
        "epsilon": trainer.epsilon(),
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "effective_noise_multiplier": plan.effective_noise,
        "sample_rate": plan.sample_rate,
        "steps": steps,
        "max_grad_norm": config.privacy.max_grad_norm,
        "examples_per_patient": group,
        "patient_epsilon": patient_epsilon(plan, steps, group, config.privacy.delta),
    }
