"""fedsynth.simulations.engines: the ways ``fedsynth simulate`` runs a whole federation on one
machine, one :class:`Engine` per value of ``simulation.engine`` (:data:`ENGINES`)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from fedsynth.common.config import RunConfig
from fedsynth.server.service import RunOutcome

logger = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "flower": "fedsynth.simulations.engines.flower",
    "inprocess": "fedsynth.simulations.engines.inprocess",
}
"""``simulation.engine`` -> the module whose ``run`` is that :class:`Engine` (imported when
asked for: the Flower engine's imports are not needed to run in process)."""


@dataclass(frozen=True)
class Federation:
    """One federation to simulate, what every engine is given.

    Attributes:
        config: the run configuration.
        sites: the site folders; simulated site ``i`` reads ``sites[i]``.
        run_dir: the coordinator's run folder.
        resume: continue the run in ``run_dir`` after its last complete round.
        state_root: keep each simulated site's own state on disk here (default: memory).
        echo: where progress lines go.
        cache_dir: the sites' preprocessed-slice cache (default: ``run_dir/cache``).
        site_misalignment: one misalignment level of domain B per site.
    """

    config: RunConfig
    sites: list[Path]
    run_dir: Path
    resume: bool = False
    state_root: Path | None = None
    echo: Callable[[str], None] = print
    cache_dir: Path | None = None
    site_misalignment: Sequence[str] = ()

    def check_sites(self) -> None:
        """Refuse site folders that do not exist.

        Raises:
            ValueError: naming the missing folders.
        """
        missing = [str(s) for s in self.sites if not Path(s).is_dir()]
        if missing:
            raise ValueError(f"site folder(s) not found: {', '.join(missing)}")


class Engine(Protocol):
    """Runs a :class:`Federation` to its end; returns how the run ended."""

    def __call__(self, federation: Federation, /) -> RunOutcome: ...


def engine_for(name: str) -> Engine:
    """The engine ``simulation.engine = name`` selects.

    Raises:
        ValueError: ``name`` is no engine of :data:`ENGINES`.
    """
    if name not in ENGINES:
        raise ValueError(f"simulation.engine {name!r} is none of {', '.join(ENGINES)}")
    return cast(Engine, importlib.import_module(ENGINES[name]).run)
