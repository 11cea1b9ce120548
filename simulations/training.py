"""The models an experiment trains: the federation (on the engine ``simulation.engine`` names),
and the local and pooled baselines with the federation's compute."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsynth.client.local import train_local
from fedsynth.common.config import RunConfig
from fedsynth.server.round_store import latest_round
from fedsynth.simulations.engines import Federation, engine_for
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.phases import Phases, phase
from fedsynth.simulations.results import POOLED, ModelResult, local_model
from fedsynth.simulations.split import Split

logger = logging.getLogger(__name__)


def baseline_config(
    config: RunConfig, name: str, folder: Path, slices: int | None, sites: int = 1
) -> RunConfig:
    """A local or pooled run with the federation's compute, in ``folder/name``: ``rounds x
    local_epochs`` epochs over its data, or, when rounds are counted in steps, as many epochs as
    ``rounds x local_steps x sites`` steps take on ``slices`` examples (a pooled model trains on
    ``sites`` sites' data, so it gets all of their steps); the same learning-rate decay."""
    fed, training = config.federation, config.training
    if fed.local_steps is not None and slices:
        per_epoch = max(1, math.ceil(slices / training.batch_size))
        epochs = max(1, round(fed.rounds * fed.local_steps * sites / per_epoch))
        decay_rounds = fed.decay_rounds
        if decay_rounds is None:
            decay_rounds = round(fed.rounds * training.decay_epochs / max(training.epochs, 1))
        decay = round(epochs * decay_rounds / fed.rounds)
    else:
        epochs = fed.rounds * fed.local_epochs
        decay_rounds = fed.decay_rounds
        if decay_rounds is None:
            decay_rounds = round(fed.rounds * training.decay_epochs / max(training.epochs, 1))
        decay = decay_rounds * fed.local_epochs
    update: dict[str, Any] = {
        "name": name,
        "output_dir": folder,
        "training": training.model_copy(update={"epochs": epochs, "decay_epochs": decay}),
    }
    if config.privacy.site_level:
        # Site-level DP protects a site's contribution to a federation; a run that releases
        # nothing to others has none to protect (see README, "Differential privacy").
        update["privacy"] = config.privacy.model_copy(update={"enabled": False})
    return config.model_copy(update=update)


def run_federated(
    config: RunConfig,
    folder: Path,
    train_dirs: Sequence[Path],
    misalignment: Sequence[str],
    *,
    resume: bool,
    state_root: Path | None,
    cache: Path,
    echo: Callable[[str], None],
) -> Path:
    """Run (or finish) the federation in ``folder/federated`` on ``simulation.engine``."""
    run_dir = folder / "federated"
    done = latest_round(run_dir) if run_dir.exists() else None
    if done == config.federation.rounds:
        return run_dir
    engine = engine_for(config.simulation.engine)
    outcome = engine(
        Federation(
            config,
            list(train_dirs),
            run_dir,
            resume=resume and done is not None,
            state_root=state_root,
            echo=echo,
            cache_dir=cache,
            site_misalignment=list(misalignment),
        )
    )
    if outcome.stopped:
        echo(f"  the federation stopped early: {outcome.stopped}")
    elif outcome.status != "finished:completed":
        raise ExperimentError(
            f"Flower run {outcome.run_id} ended as {outcome.status}; see {run_dir}/superlink.log"
        )
    return run_dir


def _train_baseline(
    config: RunConfig, site_dirs: list[Path], misalignment: list[str], cache: Path
) -> None:
    """Train one baseline run (its folder is ``config.run_dir``) on the shared slice cache."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    train_local(
        site_dirs,
        config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": cache})}),
        resume=True,
        evaluate=False,
        progress=True,
        site_misalignment=misalignment,
    )


def train_baselines(
    fed_config: RunConfig,
    split: Split,
    folder: Path,
    phases: Phases,
    cache: Path,
    echo: Callable[[str], None],
) -> list[ModelResult]:
    """Train the baselines ``simulation.baselines`` names into ``folder``, each a phase: every
    site alone (``local``), and all trainable sites' data together (``pooled``).

    Returns:
        A skipped result for each site that cannot train alone (in the plan's order).
    """
    skipped: list[ModelResult] = []
    if "local" in fed_config.simulation.baselines:
        for site in split.plan.sites:
            name = local_model(site.name)
            if site.excluded is not None or site.name in split.unusable:
                reason = site.excluded or split.unusable[site.name]
                skipped.append(ModelResult(name=name, skipped=reason))
                continue
            local = baseline_config(
                fed_config, f"local-{site.name}", folder, split.examples(site.name)
            )
            with phase(phases, name, echo, f"local-only baseline at {site.name}") as run:
                if run:
                    _train_baseline(local, [split.train_dir(site.name)], [site.misalignment], cache)
    if "pooled" in fed_config.simulation.baselines:
        trainable = split.trainable
        examples = sum(split.examples(s.name) for s in trainable)
        pooled = baseline_config(fed_config, "pooled", folder, examples, sites=len(trainable))
        with phase(
            phases, POOLED, echo, f"pooled baseline: {len(trainable)} sites' data together"
        ) as run:
            if run:
                _train_baseline(
                    pooled,
                    [split.train_dir(s.name) for s in trainable],
                    [s.misalignment for s in trainable],
                    cache,
                )
    return skipped
