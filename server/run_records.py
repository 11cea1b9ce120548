"""What a completed round leaves in the run folder: its checkpoint and ``round.json``, its line in
``rounds.jsonl``, TensorBoard scalars, ``best.json``, and the line on the terminal.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsynth.common.checkpoint import CheckpointMetadata, load_checkpoint
from fedsynth.common.io import atomic_save
from fedsynth.server.round_store import (
    BestRound,
    RoundRecord,
    consider,
    ema_dir,
    save_round,
    write_best,
)
from fedsynth.server.status import ROUNDS_LOG

logger = logging.getLogger("fedsynth.server")

SERVER_STATE = "server_state.pt"  # the aggregator's state, beside each round's checkpoint


@dataclass
class RoundSummary:
    """What :meth:`fedsynth.server.coordinator.Coordinator.run_round` returns (also written to
    ``rounds.jsonl``)."""

    round: int
    sites: list[str]
    accepted: list[str]
    rejected: dict[str, list[str]]
    train_metrics: dict[str, dict[str, float]]
    eval_metrics: dict[str, dict[str, float]]
    aggregated: dict[str, float]
    central: dict[str, float]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    seconds: float
    train_seconds: float  # sending, training and collecting, up to aggregation
    slowest_site_seconds: float  # the slowest accepted site's own report (load data + train)
    overhead_seconds: float  # round wall time minus the slowest site's training time
    epsilon: dict[str, float] = field(default_factory=dict)  # cumulative, every site so far
    worst_epsilon: float | None = None
    budget_spent: list[str] = field(default_factory=list)  # sites that refused this round


def weighted_mean(metrics: Mapping[str, Mapping[str, float]], weight_key: str) -> dict[str, float]:
    """Example-weighted mean of every metric the sites report (weights from ``weight_key``)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for values in metrics.values():
        weight = float(values.get(weight_key, 1.0))
        for key, value in values.items():
            if key in (weight_key, "partition-id") or not math.isfinite(value):
                continue
            totals[key] = totals.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


def aggregated_metrics(
    train_metrics: Mapping[str, Mapping[str, float]],
    eval_metrics: Mapping[str, Mapping[str, float]],
    central: Mapping[str, float],
) -> dict[str, float]:
    """The round's scalars: ``train/``, ``eval/`` (example-weighted over the sites) and
    ``central/``."""
    aggregated = {f"train/{k}": v for k, v in weighted_mean(train_metrics, "num-examples").items()}
    aggregated.update(
        {
            f"eval/{k}": v
            for k, v in weighted_mean(eval_metrics, "num-examples").items()
            if k not in ("num-subjects", "seconds")
        }
    )
    aggregated.update({f"central/{k}": v for k, v in central.items()})
    return aggregated


def round_record(summary: RoundSummary, delta: float) -> RoundRecord:
    """The round's ``round.json`` (``delta``: the run's, stated only when epsilons are)."""
    return RoundRecord(
        round=summary.round,
        aggregated=summary.aggregated,
        per_site={**summary.train_metrics},
        bytes_per_site=summary.bytes_up,
        epsilon_per_site=dict(summary.epsilon),
        delta=delta if summary.epsilon else None,
        rejected=summary.rejected,
        seconds=summary.seconds,
        evaluation_per_site={**summary.eval_metrics},
    )


def save_round_checkpoint(
    run_dir: Path,
    nets: Mapping[str, torch.nn.Module],
    metadata: CheckpointMetadata,
    record: RoundRecord,
    *,
    ema: Mapping[str, torch.nn.Module] | None,
    ema_decay: float | None,
    server_state: Mapping[str, Any],
) -> Path:
    """The round's folder (:func:`save_round`) and the aggregator's state beside it."""
    folder = save_round(run_dir, nets, metadata, record, ema=ema, ema_decay=ema_decay)
    atomic_save(folder / SERVER_STATE, lambda tmp: torch.save(server_state, tmp))
    return folder


def record_best(run_dir: Path, best: BestRound | None, record: RoundRecord) -> BestRound | None:
    """The best round after ``record`` (``best.json`` rewritten; a new best one is logged)."""
    previous = best.round if best is not None else None
    best = consider(best, record)
    if best is not None:
        write_best(run_dir, best)
        if best.round != previous:
            logger.info("round %d: %s", record.round, best.line)
    return best


def append_round_line(run_dir: Path, summary: RoundSummary) -> None:
    """The round's line in ``rounds.jsonl``."""
    with (run_dir / ROUNDS_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(summary), sort_keys=True) + "\n")


def load_ema(run_dir: Path, round_number: int) -> dict[str, torch.Tensor] | None:
    """The moving average a round kept (flat state), or None (with a warning) when it kept none."""
    folder = ema_dir(run_dir, round_number)
    if not folder.exists():
        logger.warning(
            "federation.ema_decay is set but round %d kept no moving average: it starts "
            "again at round %d's aggregate",
            round_number,
            round_number + 1,
        )
        return None
    _, networks = load_checkpoint(folder)
    return {
        f"{name}.{key}": value for name, state in networks.items() for key, value in state.items()
    }


class Scalars:
    """The run's TensorBoard scalars (``<run>/tensorboard``), opened at the first round written."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def write(self, summary: RoundSummary) -> None:
        writer = self._open()
        for key, value in summary.aggregated.items():
            writer.add_scalar(key, value, summary.round)
        for site, metrics in summary.train_metrics.items():
            for key in ("loss_g", "loss_cycle", "seconds"):
                if key in metrics:
                    writer.add_scalar(f"site/{site}/{key}", metrics[key], summary.round)
        for site, epsilon in summary.epsilon.items():
            writer.add_scalar(f"privacy/epsilon/{site}", epsilon, summary.round)
        if summary.worst_epsilon is not None:
            writer.add_scalar("privacy/worst_epsilon", summary.worst_epsilon, summary.round)
        writer.add_scalar("round/seconds", summary.seconds, summary.round)
        writer.add_scalar("round/overhead_seconds", summary.overhead_seconds, summary.round)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def announce_round(summary: RoundSummary, rounds: int) -> None:
    """The round's line on the terminal (and in ``coordinator.log``)."""
    psnr = summary.aggregated.get("eval/psnr", summary.aggregated.get("central/psnr"))
    loss_g = summary.aggregated.get("train/loss_g")
    privacy = ""
    if summary.worst_epsilon is not None:
        worst = max(summary.epsilon, key=lambda s: summary.epsilon[s])
        privacy = f", epsilon max {summary.worst_epsilon:.2f} ({worst})"
    logger.info(
        "round %d/%d: %d/%d sites accepted%s, %s, %s%s, up %.2f MB/site, %.1f s (overhead %.1f s)",
        summary.round,
        rounds,
        len(summary.accepted),
        len(summary.sites),
        f" (left out: {', '.join(sorted(summary.rejected))})" if summary.rejected else "",
        # Under DP the sites keep their losses (README, "What leaves a hospital").
        f"G {loss_g:.4f}" if loss_g is not None else "losses kept at the sites",
        f"PSNR {psnr:.2f} dB" if psnr is not None else "no evaluation",
        privacy,
        (sum(summary.bytes_up.values()) / max(len(summary.bytes_up), 1)) / 1e6,
        summary.seconds,
        summary.overhead_seconds,
    )
