"""A whole federation on one machine with Flower's simulation engine (``fedsynth simulate``'s
federated phase with ``simulation.engine = "flower"``, see :mod:`fedsynth.simulations.training`).

The same ServerApp and ClientApp as a deployment run, on a loopback SuperLink in simulation mode
(Ray underneath); simulated site ``i`` reads ``--site`` number ``i``. The number of simulated
nodes is always passed explicitly (Flower's default of 2 would make a 3-site run wait forever).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsynth.common.config import RunConfig
from fedsynth.common.flower_processes import free_port
from fedsynth.server.service import RunOutcome, ServeOptions, run_federation
from fedsynth.simulations.engines import Federation


def run(federation: Federation) -> RunOutcome:
    """Run ``federation`` in simulation; return how the Flower run ended.

    Ray resources per site and the Ray cluster to attach to come from ``config.simulation``;
    ``site_misalignment`` gives each site its own misalignment of domain B.
    """
    config, sites = federation.config, federation.sites
    if len(sites) < config.federation.min_sites:
        raise ValueError(
            f"{len(sites)} site(s) given, federation.min_sites is {config.federation.min_sites}"
        )
    federation.check_sites()
    options = ServeOptions(
        run_dir=federation.run_dir,
        port=free_port(),
        insecure=True,
        simulation=True,
        resume=federation.resume,
        site_dirs=sites,
        state_root=federation.state_root,
        num_supernodes=len(sites),
        cache_dir=federation.cache_dir,
        site_misalignment=federation.site_misalignment,
        cpus_per_site=config.simulation.cpus_per_site,
        gpus_per_site=config.simulation.gpus_per_site,
        ray_address=config.simulation.ray_address,
    )
    return run_federation(config, options, echo=federation.echo)


def simulate(config: RunConfig, sites: list[Path], run_dir: Path, **options: Any) -> RunOutcome:
    """:func:`run` with a :class:`~fedsynth.simulations.engines.Federation`'s fields as
    arguments (``resume``, ``state_root``, ``echo``, ``cache_dir``, ``site_misalignment``)."""
    return run(Federation(config, sites, run_dir, **options))
