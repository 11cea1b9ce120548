"""Value types of configuration fields (direction, device, paths) and the sections' base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.functional_validators import AfterValidator

from fedsynth.common.modalities import Direction


def _check_direction(value: str) -> str:
    return str(Direction.parse(value))


DirectionStr = Annotated[str, AfterValidator(_check_direction)]


def _check_device(value: str) -> str:
    text = value.strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError("must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>'")


DeviceStr = Annotated[str, AfterValidator(_check_device)]


def _absolute(path: Path) -> Path:
    """Relative to where the configuration is loaded: the ServerApp may run in another folder."""
    return path.expanduser().absolute()


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]

Misalignment = Literal["none", "slight", "moderate", "severe"]


class Section(BaseModel):
    """A configuration section (a TOML table): unknown keys are errors, assignments are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
