"""Coordinator commands: ``fedsynth server`` and ``fedsynth certs``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from common.config import ConfigError, load_config
from common.flower import FlowerError
from server.certs import make_certificates
from server.launch import INSECURE_WARNING, ServeOptions, run_federation

console = Console(soft_wrap=True)
logger = logging.getLogger("fedsynth.server")


def _sites(values: list[str] | None, certs: Path | None) -> dict[str, Path]:
    """``NAME=KEY.pub`` pairs; without any, every ``<certs>/nodes/*.pub`` under its stem."""
    sites: dict[str, Path] = {}
    for value in values or []:
        name, sep, key_file = value.partition("=")
        if not sep or not name or not key_file:
            fail(f"--site {value!r}: expected NAME=PATH/TO/KEY.pub")
        sites[name] = Path(key_file)
    if not sites and certs is not None:
        sites = {p.stem: p for p in sorted((certs / "nodes").glob("*.pub"))}
    for name, key in sites.items():
        if not key.is_file():
            fail(f"--site {name}: public key {key} not found")
    return sites


def server_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run folder (created).")],
    certs: Annotated[
        Path | None, typer.Option(help="Folder from `fedsynth certs` (ca.crt, server.*).")
    ] = None,
    site: Annotated[
        list[str] | None,
        typer.Option(help="NAME=KEY.pub to admit (repeat); default: every <certs>/nodes/*.pub."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port hospitals connect to.")] = 9092,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --run-dir after its last complete round.")
    ] = False,
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no node authentication: loopback tests only.")
    ] = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Start the coordinator: a SuperLink (TLS + node authentication) and the federated run."""
    if insecure:
        console.print(f"[bold red]WARNING[/bold red] {INSECURE_WARNING}")
    elif certs is None:
        fail("--certs is required (make them with `fedsynth certs`), or --insecure for tests")
    if resume:
        resolved = run_dir / "config.resolved.toml"
        if not resolved.exists():
            fail(f"--resume {run_dir}: no config.resolved.toml, not a fedsynth run folder")
        try:
            run = load_config(resolved, environ={})
        except ConfigError as exc:
            fail(exc, 2)
    else:
        run = resolve_config(config, preset, overrides)
    options = ServeOptions(
        run_dir=run_dir,
        host=host,
        port=port,
        certs=certs,
        sites={} if insecure else _sites(site, certs),
        insecure=insecure,
        resume=resume,
    )
    try:
        outcome = run_federation(run, options, echo=console.print)
    except (FlowerError, FileNotFoundError, ValueError) as exc:
        fail(exc)
    if outcome.stopped:
        fail(f"the run stopped: {outcome.stopped}")
    if outcome.status != "finished:completed":
        fail(f"Flower run {outcome.run_id} ended as {outcome.status}; see {run_dir}/superlink.log")
    console.print(f"done: {run_dir / 'rounds'}")


def certs_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the CA, server and node keys.")],
    site: Annotated[list[str], typer.Option(help="A hospital's name (repeat for each).")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Name or IP hospitals use to reach the coordinator (repeat)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Make a development CA, the SuperLink's certificate and one key pair per hospital."""
    try:
        made = make_certificates(out_dir, site, hosts=host or [], days=days, overwrite=overwrite)
    except (ValueError, FileExistsError) as exc:
        fail(exc)
    console.print(f"CA certificate (give to every hospital): {made.ca_cert}")
    console.print(
        f"server certificate and key (coordinator only): {made.server_cert}, {made.server_key}"
    )
    for name, (private, public) in made.node_keys.items():
        console.print(f"{name}: private key {private} (to {name} only), public key {public}")
    console.print("\nThe coordinator admits them with:")
    pairs = " ".join(f"--site {n}={pub}" for n, (_, pub) in made.node_keys.items())
    console.print(f"  fedsynth server --run-dir RUN --certs {out_dir} {pairs} --config CONFIG.toml")
    console.print("Each hospital starts its daemon with:")
    console.print(
        f"  fedsynth client --data-dir DATA --superlink HOST:9092 --ca {made.ca_cert} "
        "--key <its .key file> --device cuda:0"
    )
