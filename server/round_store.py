"""The coordinator's per-round checkpoints, the best round, and where to resume after a crash.

Each completed round writes ``<run>/rounds/round-NNNN/`` (generators in safetensors plus
``checkpoint.json``, see :mod:`fedsynth.common.checkpoint`) and ``round.json`` beside them: the
round's aggregated and per-site metrics (training and validation), bytes moved per site, privacy
spent per site and the sites left out with their reasons. With ``federation.ema_decay`` the round
folder also holds ``ema/``, a checkpoint of the same format with the moving average of the
aggregated generators. ``<run>/latest`` (a small text file, replaced atomically) names the last
complete round; a round folder without it finished is never picked for resuming. No round folder is
ever deleted, so the best round's checkpoint stays wherever the run goes on.

**The best round** is the one with the highest example-weighted masked PSNR of the global model on
the sites' own validation data (``eval/psnr_masked``, :mod:`fedsynth.common.data.validation`). Only
when no site reported a validation score in a round does the central validation site
(``federation.validation_site``, ``central/psnr_masked``) score it, and a round scored on the sites'
data always outranks one scored centrally. No test site is ever used. Ties keep the earlier round.
``<run>/best.json`` (rewritten atomically after each round) records the round, its score, the metric
and the per-site validation scores; :func:`best_round` reads it, and recomputes the choice from the
rounds' records when it is missing or older than the latest round (a crash between the two writes,
or a run from before best.json).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsynth.common.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from fedsynth.common.io import atomic_write_text

ROUNDS_DIR = "rounds"
LATEST_NAME = "latest"
ROUND_RECORD = "round.json"
BEST_NAME = "best.json"
EMA_DIR = "ema"
# Round-selection metrics, most trusted first: the sites' own validation data, then the central
# validation site (only for rounds no site scored).
SELECTION_METRICS = ("eval/psnr_masked", "central/psnr_masked")
SELECTION_SOURCES = {
    "eval/psnr_masked": "the sites' validation data",
    "central/psnr_masked": "the central validation site",
}


@dataclass
class RoundRecord:
    """What happened in one round, as the coordinator saw it (scalars only, no images)."""

    round: int
    aggregated: dict[str, float] = field(default_factory=dict)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_per_site: dict[str, int] = field(default_factory=dict)
    epsilon_per_site: dict[str, float] = field(default_factory=dict)
    delta: float | None = None  # the delta every epsilon above is stated at
    rejected: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    # Each site's scores of this round's global model on its own validation data.
    evaluation_per_site: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst_epsilon(self) -> float | None:
        return max(self.epsilon_per_site.values()) if self.epsilon_per_site else None


@dataclass
class BestRound:
    """The round a run would publish: see the module docstring for how it is chosen.

    Attributes:
        round: the best round so far.
        score: its selection score (dB).
        metric: the aggregated key it was chosen by (one of :data:`SELECTION_METRICS`).
        source: what was scored, in words.
        per_site: each site's own score of that round (the metric's site-level value).
        examples: each site's validation examples (the weights of the mean).
        last_round: the last round considered.
    """

    round: int
    score: float
    metric: str
    source: str
    per_site: dict[str, float] = field(default_factory=dict)
    examples: dict[str, float] = field(default_factory=dict)
    last_round: int = 0

    @property
    def line(self) -> str:
        """``best round 3 (24.10 dB on the sites' validation data)``."""
        return f"best round {self.round} ({self.score:.2f} dB on {self.source})"


def round_dir(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{round_number:04d}"


def ema_dir(run_dir: Path, round_number: int) -> Path:
    """The moving-average checkpoint of a round (present with ``federation.ema_decay``)."""
    return round_dir(run_dir, round_number) / EMA_DIR


def save_round(
    run_dir: Path,
    generators: Mapping[str, torch.nn.Module],
    metadata: CheckpointMetadata,
    record: RoundRecord,
    *,
    ema: Mapping[str, torch.nn.Module] | None = None,
    ema_decay: float | None = None,
) -> Path:
    """Write round ``record.round``'s checkpoint and record, then mark it the latest.

    ``ema``: the moving average of the generators, written first to ``ema/`` as a checkpoint
    of its own (metrics: ``ema_decay``), so a round marked complete always has it.
    """
    folder = round_dir(run_dir, record.round)
    meta = metadata.model_copy(
        update={
            "kind": "federated",
            "round": record.round,
            "metrics": dict(record.aggregated),
            "privacy": (
                {
                    "epsilon_per_site": record.epsilon_per_site,
                    "worst_epsilon": record.worst_epsilon,
                    "delta": record.delta,
                }
                if record.epsilon_per_site
                else None
            ),
        }
    )
    save_checkpoint(folder, generators, meta)
    if ema is not None:
        ema_meta = meta.model_copy(
            update={"metrics": {"ema_decay": ema_decay} if ema_decay is not None else {}}
        )
        save_checkpoint(folder / EMA_DIR, ema, ema_meta)
    atomic_write_text(folder / ROUND_RECORD, json.dumps(asdict(record), indent=2) + "\n")
    atomic_write_text(Path(run_dir) / LATEST_NAME, f"{record.round}\n")
    return folder


def latest_round(run_dir: Path) -> int | None:
    """The last complete round of a run, or None when no round has completed."""
    marker = Path(run_dir) / LATEST_NAME
    if not marker.exists():
        return None
    text = marker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected a round number, found {text!r}")
    number = int(text)
    if not (round_dir(run_dir, number) / ROUND_RECORD).exists():
        raise ValueError(f"{marker} names round {number}, but its folder is incomplete")
    return number


def load_round(
    run_dir: Path, round_number: int | None = None
) -> tuple[CheckpointMetadata, dict[str, dict[str, torch.Tensor]], RoundRecord]:
    """Read a round's checkpoint and record (default: the latest complete round)."""
    number = latest_round(run_dir) if round_number is None else round_number
    if number is None:
        raise FileNotFoundError(f"{run_dir}: no completed round to resume from")
    folder = round_dir(run_dir, number)
    metadata, networks = load_checkpoint(folder)
    raw: dict[str, Any] = json.loads((folder / ROUND_RECORD).read_text(encoding="utf-8"))
    return metadata, networks, RoundRecord(**raw)


def read_record(run_dir: Path, round_number: int) -> RoundRecord:
    """A round's ``round.json`` (without its weights)."""
    path = round_dir(run_dir, round_number) / ROUND_RECORD
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return RoundRecord(**raw)


# ----------------------------------------------------------------------------- the best round


def selection_score(record: RoundRecord) -> tuple[int, str, float] | None:
    """(rank, metric, score) a round competes with, or None when nothing scored it.

    The rank orders the metrics' trust (:data:`SELECTION_METRICS`): a higher rank always wins.
    """
    for index, metric in enumerate(SELECTION_METRICS):
        value = record.aggregated.get(metric)
        if value is not None and not math.isnan(value):
            return len(SELECTION_METRICS) - index, metric, float(value)
    return None


def _rank(best: BestRound) -> tuple[int, float]:
    index = SELECTION_METRICS.index(best.metric) if best.metric in SELECTION_METRICS else None
    return (0 if index is None else len(SELECTION_METRICS) - index), best.score


def consider(best: BestRound | None, record: RoundRecord) -> BestRound | None:
    """The best round once ``record`` is taken into account (ties keep the earlier round)."""
    scored = selection_score(record)
    if scored is not None:
        rank, metric, score = scored
        if best is None or (rank, score) > _rank(best):
            site_key = metric.partition("/")[2]
            per_site = (
                {
                    site: float(values[site_key])
                    for site, values in sorted(record.evaluation_per_site.items())
                    if site_key in values
                }
                if metric.startswith("eval/")
                else {}
            )
            examples = (
                {
                    site: float(values.get("num-examples", 0.0))
                    for site, values in sorted(record.evaluation_per_site.items())
                    if site_key in values
                }
                if metric.startswith("eval/")
                else {}
            )
            best = BestRound(
                round=record.round,
                score=score,
                metric=metric,
                source=SELECTION_SOURCES.get(metric, metric),
                per_site=per_site,
                examples=examples,
            )
    if best is not None:
        best.last_round = max(best.last_round, record.round)
    return best


def choose_best(records: Iterable[RoundRecord]) -> BestRound | None:
    """The best of ``records`` (in round order), or None when no round was scored."""
    best: BestRound | None = None
    for record in sorted(records, key=lambda r: r.round):
        best = consider(best, record)
    return best


def scan_best(run_dir: Path) -> BestRound | None:
    """Choose the best round again from every complete round's record."""
    last = latest_round(run_dir)
    if last is None:
        return None
    records = [
        read_record(run_dir, number)
        for number in range(1, last + 1)
        if (round_dir(run_dir, number) / ROUND_RECORD).exists()
    ]
    return choose_best(records)


def write_best(run_dir: Path, best: BestRound) -> Path:
    """Write ``best.json`` atomically."""
    path = Path(run_dir) / BEST_NAME
    atomic_write_text(path, json.dumps(asdict(best), indent=2, sort_keys=True) + "\n")
    return path


def read_best(run_dir: Path) -> BestRound | None:
    """The best round of a run, up to date with its latest round; None when none was scored.

    Reads ``best.json``; recomputes from the rounds' records (:func:`scan_best`) when the file
    is missing, unreadable or older than the latest complete round.
    """
    path = Path(run_dir) / BEST_NAME
    last = latest_round(run_dir)
    if last is None:
        return None
    if path.exists():
        try:
            best = BestRound(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            best = None
        if best is not None and best.last_round >= last and best.round <= last:
            return best
    return scan_best(run_dir)


def best_round(run_dir: Path) -> int | None:
    """The best round of a run (see the module docstring), or None when no round was scored."""
    best = read_best(run_dir)
    return best.round if best is not None else None


def best_checkpoint(run_dir: Path, *, ema: bool = False) -> Path | None:
    """The checkpoint folder of the best round (its ``ema/`` one with ``ema``), or None when no
    round was scored. Loadable like any checkpoint (``fedsynth synthesize`` / ``evaluate``).

    Raises:
        FileNotFoundError: ``ema`` asked for, and the run kept no moving average.
    """
    number = best_round(run_dir)
    if number is None:
        return None
    folder = ema_dir(run_dir, number) if ema else round_dir(run_dir, number)
    if ema and not folder.exists():
        raise FileNotFoundError(
            f"{folder}: round {number} has no moving-average checkpoint (federation.ema_decay "
            "was off)"
        )
    return folder
