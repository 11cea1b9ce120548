"""A whole federation on one machine with Flower's simulation engine (``fedsynth simulate``'s
federated phase, see :mod:`fedsynth.simulations.run`).

The same ServerApp and ClientApp as a deployment run, on a loopback SuperLink in simulation mode
(Ray underneath); simulated site ``i`` reads ``--site`` number ``i``. The number of simulated
nodes is always passed explicitly (Flower's default of 2 would make a 3-site run wait forever).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fedsynth.common.config import RunConfig
from fedsynth.common.flower_processes import free_port
from fedsynth.server.service import RunOutcome, ServeOptions, run_federation


def simulate(
    config: RunConfig,
    sites: list[Path],
    run_dir: Path,
    *,
    resume: bool = False,
    state_root: Path | None = None,
    echo: Callable[[str], None] = print,
    cache_dir: Path | None = None,
    site_misalignment: Sequence[str] = (),
) -> RunOutcome:
    """Run a federation of ``sites`` in simulation; return how the Flower run ended.

    Ray resources per site and the Ray cluster to attach to come from ``config.simulation``;
    ``site_misalignment`` gives each site its own misalignment of domain B.
    """
    if len(sites) < config.federation.min_sites:
        raise ValueError(
            f"{len(sites)} site(s) given, federation.min_sites is {config.federation.min_sites}"
        )
    missing = [str(s) for s in sites if not Path(s).is_dir()]
    if missing:
        raise ValueError(f"site folder(s) not found: {', '.join(missing)}")
    options = ServeOptions(
        run_dir=run_dir,
        port=free_port(),
        insecure=True,
        simulation=True,
        resume=resume,
        site_dirs=sites,
        state_root=state_root,
        num_supernodes=len(sites),
        cache_dir=cache_dir,
        site_misalignment=site_misalignment,
        cpus_per_site=config.simulation.cpus_per_site,
        gpus_per_site=config.simulation.gpus_per_site,
        ray_address=config.simulation.ray_address,
    )
    return run_federation(config, options, echo=echo)
