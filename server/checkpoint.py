"""The coordinator's per-round checkpoints, and finding where to resume after a crash.

Each completed round writes ``<run>/rounds/round-NNNN/`` (generators in safetensors plus
``checkpoint.json``, see :mod:`common.checkpoint`) and ``round.json`` beside them: the round's
aggregated and per-site metrics, bytes moved per site, privacy spent per site and the sites left
out with their reasons. ``<run>/latest`` (a small text file, replaced atomically) names the last
complete round; a round folder without it finished is never picked for resuming.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from common.io import atomic_write_text

ROUNDS_DIR = "rounds"
LATEST_NAME = "latest"
ROUND_RECORD = "round.json"


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

    @property
    def worst_epsilon(self) -> float | None:
        return max(self.epsilon_per_site.values()) if self.epsilon_per_site else None


def round_dir(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{round_number:04d}"


def save_round(
    run_dir: Path,
    generators: Mapping[str, torch.nn.Module],
    metadata: CheckpointMetadata,
    record: RoundRecord,
) -> Path:
    """Write round ``record.round``'s checkpoint and record, then mark it the latest."""
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
