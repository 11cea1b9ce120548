"""An experiment's folder and its ``phases.json``: which phases are complete, so that
``--resume`` skips them, and a refusal to mix a new experiment into an old one."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.io import atomic_write_text
from fedsynth.simulations.errors import ExperimentError

logger = logging.getLogger(__name__)

PHASES_NAME = "phases.json"
MADE_BY = "fedsynth simulate"


@dataclass
class Phases:
    """``phases.json``: which phases are complete, and how long each took."""

    path: Path
    done: dict[str, float]

    @classmethod
    def open(cls, folder: Path) -> Phases:
        path = folder / PHASES_NAME
        if path.exists():
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, {str(k): float(v) for k, v in record.get("done", {}).items()})
        return cls(path, {})

    def finished(self, name: str) -> bool:
        return name in self.done

    def mark(self, name: str, seconds: float) -> None:
        self.done[name] = seconds
        record = {"made_by": MADE_BY, "done": self.done}
        atomic_write_text(self.path, json.dumps(record, indent=2) + "\n")


@contextmanager
def phase(phases: Phases, name: str, echo: Callable[[str], None], what: str) -> Iterator[bool]:
    """Yield whether the phase must run; time it and mark it done when its block completes."""
    if phases.finished(name):
        echo(f"[{name}] done earlier ({phases.done[name]:.0f} s): skipped")
        yield False
        return
    echo(f"[{name}] {what}")
    start = time.perf_counter()
    yield True
    phases.mark(name, time.perf_counter() - start)


def prepare_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the experiment folder; refuse to mix a new experiment into an old one."""
    marker = folder / PHASES_NAME
    if folder.exists() and any(folder.iterdir()):
        if overwrite:
            if not marker.exists():
                raise ExperimentError(
                    f"{folder} was not made by `{MADE_BY}` (no {PHASES_NAME}): "
                    "refusing to delete it"
                )
            shutil.rmtree(folder)
        elif not resume:
            raise ExperimentError(
                f"{folder} already holds an experiment: pass --resume to continue it, "
                "--overwrite to start again, or choose another --run-dir / --set name=..."
            )
    folder.mkdir(parents=True, exist_ok=True)
