"""The evaluate phase: every model an experiment made (untrained, the starting point, the
federated model after every round and the one selected, the baselines, the naive baselines)
found on disk and scored on the test sets, plus the sample slices."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.client.local import BEST_CHECKPOINT_DIR, best_epoch
from fedsynth.common.checkpoint import read_metadata
from fedsynth.common.config import RunConfig
from fedsynth.common.models import define_cyclegan
from fedsynth.common.synthesis import Synthesizer
from fedsynth.server.coordinator import RUN_FILE
from fedsynth.server.round_store import (
    EMA_DIR,
    ROUND_RECORD,
    best_checkpoint,
    latest_round,
    read_best,
    round_dir,
)
from fedsynth.simulations.evaluation import NaiveBaselines, TestSets, Translate, naive_baselines
from fedsynth.simulations.partition import SitePlan
from fedsynth.simulations.phases import Phases
from fedsynth.simulations.results import (
    FEDERATED,
    LOOKUP_TABLE,
    NAIVE,
    POOLED,
    STARTING_POINT,
    UNTRAINED,
    ModelResult,
    RoundPoint,
    SampleSlices,
    local_model,
)
from fedsynth.simulations.split import Split

logger = logging.getLogger(__name__)


def _untrained(config: RunConfig) -> Translate:
    generator = define_cyclegan(config.model, config.data.image_size, seed=config.training.seed)[
        "g_ab"
    ].eval()

    @torch.no_grad()
    def translate(slices: np.ndarray) -> np.ndarray:
        parts = [
            generator(torch.from_numpy(np.ascontiguousarray(slices[i : i + 32]))[:, None])[:, 0]
            for i in range(0, len(slices), 32)
        ]
        return torch.cat(parts).numpy()

    return translate


def _starting_point(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint round 1 started from (``run.json``), with what it was; None: random."""
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        return None
    run = json.loads(run_file.read_text(encoding="utf-8"))
    start = run.get("initial_generators")
    if not start:
        return None
    warm = run.get("warm_start")
    info = dict(warm or {})
    info["what"] = (
        f"the phantom warm start ({warm['steps']} steps on {warm['subjects']} phantom subjects, "
        "no site data)"
        if warm
        else f"federation.initial_generators ({start['kind']} checkpoint)"
    )
    return Path(start["path"]), info


def _checkpoint(path: Path) -> Translate:
    return Synthesizer(path, device="cpu", batch_size=32).translate_slices


def _selected_round(run_dir: Path, last: int, config: RunConfig) -> tuple[int, Path, str]:
    """The federated round to report: the best on the sites' validation data (the EMA weights
    of that round with ``federation.ema_decay``), else the last round, and how it was chosen."""
    best = read_best(run_dir)
    if best is None:
        return last, round_dir(run_dir, last), f"last round ({last}): no site validated"
    ema = config.federation.ema_decay is not None
    folder = best_checkpoint(run_dir, ema=ema) or round_dir(run_dir, best.round)
    how = (
        f"round {best.round} of {last}, best on the sites' validation data "
        f"({best.score:.2f} dB masked PSNR)"
    )
    return best.round, folder, how + (", EMA weights" if folder.name == EMA_DIR else "")


def _rounds(run_dir: Path, tests: TestSets, untrained: dict[str, Any]) -> list[RoundPoint]:
    points = [RoundPoint(round=0, per_site=untrained["per_site"], mean=untrained["mean"])]
    last = latest_round(run_dir) or 0
    log = {}
    rounds_log = run_dir / "rounds.jsonl"
    if rounds_log.exists():
        for line in rounds_log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                log[int(entry["round"])] = entry
    for number in range(1, last + 1):
        folder = round_dir(run_dir, number)
        if not (folder / ROUND_RECORD).exists():
            continue
        per_site, mean = tests.evaluate(_checkpoint(folder))
        entry = log.get(number, {})
        points.append(
            RoundPoint(
                round=number,
                per_site=per_site,
                mean=mean,
                epsilon={k: float(v) for k, v in entry.get("epsilon", {}).items()},
                bytes_up={k: int(v) for k, v in entry.get("bytes_up", {}).items()},
                bytes_down={k: int(v) for k, v in entry.get("bytes_down", {}).items()},
                seconds=float(entry.get("seconds", 0.0)),
            )
        )
    return points


@dataclass
class Scores:
    """What the evaluate phase measured.

    Attributes:
        models: every model's result, in the report's order.
        rounds: the federated model after every round (round 0: what the sites started from).
        samples: one sample slice per site, every model's synthesis of it.
        naive: the naive baselines and the statistics they were fitted from.
    """

    models: list[ModelResult]
    rounds: list[RoundPoint]
    samples: list[SampleSlices]
    naive: NaiveBaselines


@dataclass
class _Scoring:
    """The evaluate phase's state: the models scored so far, and each one's translation."""

    tests: TestSets
    folder: Path
    models: list[ModelResult]
    translators: dict[str, Translate] = field(default_factory=dict)


def _score_start(scoring: _Scoring, config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Score the untrained model and the federation's starting point (if it had one); return
    round 0 of the curve: what the sites received first."""
    tests, models = scoring.tests, scoring.models
    untrained_translate = _untrained(config)
    per_site, mean = tests.evaluate(untrained_translate)
    models.insert(0, ModelResult(name=UNTRAINED, per_site=per_site, mean=mean))
    round_zero = {"per_site": per_site, "mean": mean}
    scoring.translators[UNTRAINED] = untrained_translate
    starting = _starting_point(run_dir)
    if starting is not None:  # round 0 is what the sites received first, not random weights
        start_checkpoint, start_info = starting
        scoring.translators[STARTING_POINT] = _checkpoint(start_checkpoint)
        per_site, mean = tests.evaluate(scoring.translators[STARTING_POINT])
        round_zero = {"per_site": per_site, "mean": mean}
        models.insert(
            1,
            ModelResult(
                name=STARTING_POINT,
                per_site=per_site,
                mean=mean,
                train_seconds=float(start_info.get("seconds", 0.0)),
                steps=int(start_info.get("steps", 0)),
                checkpoint=str(start_checkpoint),
                selected=start_info["what"],
            ),
        )
    return round_zero


def _score_federated(
    scoring: _Scoring,
    config: RunConfig,
    run_dir: Path,
    rounds: Sequence[RoundPoint],
    phases: Phases,
) -> None:
    """Score the federated model: the round selected (its round's scores, recomputed for EMA
    weights)."""
    last = latest_round(run_dir)
    if last is None:
        return
    chosen, checkpoint, selected = _selected_round(run_dir, last, config)
    point = next((p for p in rounds if p.round == chosen), rounds[-1])
    scoring.translators[FEDERATED] = _checkpoint(checkpoint)
    per_site, mean = point.per_site, point.mean
    if checkpoint.name == EMA_DIR:
        per_site, mean = scoring.tests.evaluate(scoring.translators[FEDERATED])
    fed_seconds = sum(p.seconds for p in rounds)
    scoring.models.insert(
        1,
        ModelResult(
            name=FEDERATED,
            per_site=per_site,
            mean=mean,
            train_seconds=phases.done.get("federated", fed_seconds),
            epochs=last * config.federation.local_epochs,  # the compute; `selected` says which
            checkpoint=str(checkpoint.relative_to(scoring.folder)),
            selected=selected,
        ),
    )


def _score_baselines(scoring: _Scoring, sites: Sequence[SitePlan], phases: Phases) -> None:
    """Score the pooled and local baselines that trained: each one's best epoch on the sites'
    validation data, else its last."""
    folder = scoring.folder
    baselines = folder / "baselines"
    for kind, run_name in [(POOLED, "pooled")] + [
        (local_model(s.name), f"local-{s.name}") for s in sites if s.excluded is None
    ]:
        checkpoint = baselines / run_name / "checkpoint"
        if not (checkpoint / "checkpoint.json").exists():
            continue
        last_epoch = read_metadata(checkpoint).epoch
        selected = f"last epoch ({last_epoch})"
        if (baselines / run_name / BEST_CHECKPOINT_DIR / "checkpoint.json").exists():
            checkpoint = baselines / run_name / BEST_CHECKPOINT_DIR
            epoch = best_epoch(baselines / run_name)
            selected = f"epoch {epoch} of {last_epoch}, best on the sites' validation data"
        meta = read_metadata(checkpoint)
        scoring.translators[kind] = _checkpoint(checkpoint)
        per_site, mean = scoring.tests.evaluate(scoring.translators[kind])
        result = ModelResult(
            name=kind,
            per_site=per_site,
            mean=mean,
            train_seconds=phases.done.get(kind, 0.0),
            epochs=last_epoch,  # the compute spent; `selected` names the epoch scored
            steps=meta.step,
            checkpoint=str(checkpoint.relative_to(folder)),
            selected=selected,
        )
        scoring.models[:] = [m for m in scoring.models if m.name != kind]
        scoring.models.append(result)


def _score_naive(scoring: _Scoring, naive: NaiveBaselines) -> None:
    """Score the naive baselines that could be fitted; list the others as skipped."""
    for name in NAIVE:
        if name not in naive.predictors:
            scoring.models.append(
                ModelResult(name=name, skipped=naive.skipped.get(name, "not fitted"))
            )
            continue
        per_site, mean = scoring.tests.evaluate_predictor(naive.predictors[name])
        scoring.models.append(
            ModelResult(name=name, per_site=per_site, mean=mean, train_seconds=naive.seconds)
        )


def evaluate_models(
    config: RunConfig,
    folder: Path,
    split: Split,
    tests: TestSets,
    models: list[ModelResult],
    phases: Phases,
    cache: Path,
    echo: Callable[[str], None],
) -> Scores:
    """The evaluate phase: score every model of the experiment in ``folder`` on ``tests``
    (``models``: the results known before, the skipped baselines), fit and score the naive
    baselines from the trainable sites, save the sample slices; mark the phase done."""
    echo("[evaluate] every model on every site's held-out test subjects")
    evaluate_start = time.perf_counter()
    scoring = _Scoring(tests, folder, models)
    run_dir = folder / "federated"
    round_zero = _score_start(scoring, config, run_dir)
    rounds = _rounds(run_dir, tests, round_zero)
    _score_federated(scoring, config, run_dir, rounds, phases)
    _score_baselines(scoring, split.plan.sites, phases)
    naive = naive_baselines(
        config, {s.name: split.train_dir(s.name) for s in split.trainable}, cache
    )
    _score_naive(scoring, naive)
    shown = {k: v for k, v in naive.predictors.items() if k == LOOKUP_TABLE}
    samples = tests.samples(scoring.translators, folder, shown) if config.simulation.samples else []
    phases.mark("evaluate", time.perf_counter() - evaluate_start)
    return Scores(scoring.models, rounds, samples, naive)
