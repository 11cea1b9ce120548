"""Model checkpoints: generator weights in safetensors plus JSON metadata, written crash-safely.

A checkpoint is a folder holding ``generators.safetensors`` (tensors only: nothing is unpickled
when it is read) and ``checkpoint.json`` (what is needed to use the weights: the direction, the
model and preprocessing configuration, the intensity scale of the outputs, and the provenance:
round or epoch, metrics, privacy spent; optionally the training sites' merged intensity
statistics, from which ``fedsynth evaluate`` fits the naive baselines). The weights are written
first and the metadata last, each through a temporary file and a rename, so a crash leaves
either the previous checkpoint or a complete new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsynth.common import __version__
from fedsynth.common.baselines import IntensityStats
from fedsynth.common.config import DataConfig, ModelConfig
from fedsynth.common.io import atomic_path, atomic_write_text
from fedsynth.common.modalities import Direction

WEIGHTS_NAME = "generators.safetensors"
METADATA_NAME = "checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model it claims to hold."""


class OutputScale(BaseModel):
    """How synthesized intensities map back to native units: model -1..1 -> low..high."""

    low: float
    high: float
    kind: Literal["percentile", "window"]


class CheckpointMetadata(BaseModel):
    """Everything a checkpoint's user needs besides the weights."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    fedsynth_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: Literal["local", "pooled", "federated", "untrained", "warm-start"]
    direction: str
    model: ModelConfig
    data: DataConfig
    output_scale: OutputScale | None = None
    epoch: int | None = None
    round: int | None = None
    step: int = 0
    sites: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    # The training sites' merged intensity statistics
    # (fedsynth.common.baselines.IntensityStats.to_dict, e.g. from
    # fedsynth.common.baselines.baseline_statistics): the naive baselines `fedsynth evaluate` scores
    # beside the model. None in checkpoints made without them (older ones included).
    baselines: dict[str, Any] | None = None

    @field_validator("baselines")
    @classmethod
    def _readable_statistics(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            IntensityStats.from_dict(value)  # raises ValueError naming what is wrong
        return value

    @property
    def parsed_direction(self) -> Direction:
        return Direction.parse(self.direction)


def _folder(path: Path) -> Path:
    """Accept the checkpoint folder or either of its two files."""
    path = Path(path)
    return path.parent if path.name in (WEIGHTS_NAME, METADATA_NAME) else path


def save_checkpoint(
    path: Path, generators: Mapping[str, torch.nn.Module], metadata: CheckpointMetadata
) -> Path:
    """Write ``generators`` (e.g. ``{"g_ab": ..., "g_ba": ...}``) and ``metadata`` into ``path``.

    Returns:
        The checkpoint folder.
    """
    folder = _folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
        for name, module in generators.items()
        for key, value in module.state_dict().items()
    }
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(
            tensors, str(tmp), metadata={"format": "fedsynth", "version": str(FORMAT_VERSION)}
        )
    atomic_write_text(folder / METADATA_NAME, metadata.model_dump_json(indent=2) + "\n")
    return folder


def read_metadata(path: Path) -> CheckpointMetadata:
    """Read and validate a checkpoint's ``checkpoint.json``."""
    meta_path = _folder(path) / METADATA_NAME
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{meta_path} not found: {path} is not a fedsynth checkpoint (or an incomplete one)"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    try:
        metadata = CheckpointMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise CheckpointError(f"{meta_path}: invalid metadata ({problems})") from None
    if metadata.format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {metadata.format_version} is newer than this "
            f"fedsynth understands ({FORMAT_VERSION}); upgrade fedsynth"
        )
    return metadata


def load_checkpoint(path: Path) -> tuple[CheckpointMetadata, dict[str, dict[str, torch.Tensor]]]:
    """Read a checkpoint: its metadata and, per network name, a state dict (CPU tensors)."""
    metadata = read_metadata(path)
    weights_path = _folder(path) / WEIGHTS_NAME
    try:
        flat = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path} not found: incomplete checkpoint") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    networks: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, param = key.partition(".")
        networks.setdefault(name, {})[param] = tensor
    return metadata, networks


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """``module.load_state_dict(state)`` with an error that names the checkpoint and the keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]
                )
            )
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    module.load_state_dict(dict(state))
