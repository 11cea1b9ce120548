"""``fedsynth simulate``: a whole federation on one machine with Flower's simulation engine.

The same ServerApp and ClientApp as a deployment run, on a loopback SuperLink in simulation mode
(Ray underneath); simulated site ``i`` reads ``--site`` number ``i``. The number of simulated
nodes is always passed explicitly (Flower's default of 2 would make a 3-site run wait forever).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from common.config import RunConfig
from common.flower import FlowerError, free_port
from server.launch import RunOutcome, ServeOptions, run_federation

console = Console(soft_wrap=True)


def simulate(
    config: RunConfig,
    sites: list[Path],
    run_dir: Path,
    *,
    resume: bool = False,
    state_root: Path | None = None,
    echo: Callable[[str], None] = print,
) -> RunOutcome:
    """Run a federation of ``sites`` in simulation; return how the Flower run ended."""
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
    )
    return run_federation(config, options, echo=echo)


def simulate_command(
    site: Annotated[list[Path], typer.Option("--site", help="A site folder (repeat per site).")],
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run folder (created).")],
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --run-dir after its last complete round.")
    ] = False,
    state_root: Annotated[
        Path | None,
        typer.Option(help="Keep each site's own state on disk here (default: in memory)."),
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Simulate a federation of the given sites on this machine (Flower simulation engine)."""
    run = resolve_config(config, preset, overrides)
    try:
        outcome = simulate(
            run, site, run_dir, resume=resume, state_root=state_root, echo=console.print
        )
    except (FlowerError, ValueError, FileNotFoundError) as exc:
        fail(exc)
    if outcome.stopped:
        fail(f"the run stopped: {outcome.stopped}")
    if outcome.status != "finished:completed":
        fail(f"Flower run {outcome.run_id} ended as {outcome.status}; see {run_dir}/superlink.log")
    console.print(f"done: {run_dir / 'rounds'}")
