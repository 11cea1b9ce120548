"""Coordinator commands: ``fedsynth server`` and ``fedsynth certs``."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedsynth.common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from fedsynth.common.config import RESOLVED_CONFIG_NAME, ConfigError, load_config
from fedsynth.common.flower_processes import FlowerError
from fedsynth.server.certs import SITE_NAME, check_certificates, make_certificates, make_node_key
from fedsynth.server.service import (
    INSECURE_WARNING,
    ServeOptions,
    ServerInterruptedError,
    run_federation,
)
from fedsynth.server.status import FINAL_STATES, RunStatus, read_status

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
    resume_if_exists: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --run-dir if it holds one, else start it with --config "
            "(one command line for a service that restarts)."
        ),
    ] = False,
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no node authentication: loopback tests only.")
    ] = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Start the coordinator: a SuperLink (TLS + node authentication) and the federated run."""
    if resume_if_exists and (run_dir / RESOLVED_CONFIG_NAME).exists():
        resume = True
        console.print(f"{run_dir} holds a run: continuing it (its saved configuration applies)")
    if insecure:
        console.print(f"[bold red]WARNING[/bold red] {INSECURE_WARNING}")
    elif certs is None:
        fail("--certs is required (make them with `fedsynth certs`), or --insecure for tests")
    if resume:
        resolved = run_dir / RESOLVED_CONFIG_NAME
        if not resolved.exists():
            fail(f"--resume {run_dir}: no config.resolved.toml, not a fedsynth run folder")
        try:
            run = load_config(resolved, environ={})
        except ConfigError as exc:
            fail(exc, 2)
    else:
        run = resolve_config(config, preset, overrides)
    sites = {} if insecure else _sites(site, certs)
    if not insecure and not sites and not resume:
        fail(
            f"no hospital to admit: {certs}/nodes/ holds no <site>.pub and no --site NAME=KEY.pub "
            "was given (node authentication would refuse every hospital)"
        )
    options = ServeOptions(
        run_dir=run_dir,
        host=host,
        port=port,
        certs=certs,
        sites=sites,
        insecure=insecure,
        resume=resume,
    )
    try:
        outcome = run_federation(run, options, echo=console.print)
    except (FlowerError, FileNotFoundError, ValueError) as exc:
        fail(exc)
    except KeyboardInterrupt as exc:  # SIGTERM (docker stop, systemd) or Ctrl-C
        signum = exc.signum if isinstance(exc, ServerInterruptedError) else signal.SIGINT
        _report_interruption(run_dir, certs, insecure, signum)
        raise typer.Exit(128 + signum) from None
    if outcome.status == "finished:stopped" and outcome.stopped:  # an operator's `flwr stop`
        console.print(outcome.stopped)
        access = "--insecure" if insecure else f"--certs {certs}"
        if "--resume" in outcome.stopped:
            console.print(f"continue with: fedsynth server --run-dir {run_dir} {access} --resume")
        return
    if outcome.stopped:
        fail(f"the run stopped: {outcome.stopped}")
    if outcome.status != "finished:completed":
        fail(f"Flower run {outcome.run_id} ended as {outcome.status}; see {run_dir}/superlink.log")
    console.print(f"done: {run_dir / 'rounds'}")


def _report_interruption(run_dir: Path, certs: Path | None, insecure: bool, signum: int) -> None:
    """What an operator needs after ``docker stop``: where the run stands, how to go on."""
    name = signal.Signals(signum).name
    try:
        status = read_status(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"stopped by {name} before the run started ({exc})")
        return
    console.print(
        f"stopped by {name}: SuperLink stopped; {status.completed}/{status.rounds} rounds "
        "complete" + (f"; coordinator: {status.detail}" if status.detail else "")
    )
    if status.completed < status.rounds:
        access = "--insecure" if insecure else f"--certs {certs}"
        console.print(f"continue with: fedsynth server --run-dir {run_dir} {access} --resume")


def certs_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the CA, server and node keys.")],
    site: Annotated[
        list[str] | None,
        typer.Option(
            help="Make a key pair for this hospital (repeat). Leave out for hospitals that make "
            "their own with `fedsynth keygen` (then only their .pub files come here)."
        ),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Name or IP hospitals use to reach the coordinator (repeat)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
    exist_ok: Annotated[
        bool,
        typer.Option(
            help="If OUT_DIR already holds a CA, a server certificate for every --host and a key "
            "pair for every --site, keep them and succeed (for start-up scripts and compose)."
        ),
    ] = False,
) -> None:
    """Make a development CA, the SuperLink's certificate and one key pair per hospital."""
    if exist_ok and not overwrite and (out_dir / "ca.key").exists():
        try:
            check_certificates(out_dir, site or [], hosts=host or [])
        except (ValueError, FileNotFoundError) as exc:
            fail(f"{out_dir} holds a CA but not what was asked: {exc}")
        console.print(f"kept the certificates and keys already in {out_dir}")
        return
    try:
        made = make_certificates(
            out_dir, site or [], hosts=host or [], days=days, overwrite=overwrite
        )
    except (ValueError, FileExistsError) as exc:
        fail(exc)
    console.print(f"CA certificate (give to every hospital): {made.ca_cert}")
    console.print(
        f"server certificate and key (coordinator only): {made.server_cert}, {made.server_key}"
    )
    for name, (private, public) in made.node_keys.items():
        console.print(f"{name}: private key {private} (to {name} only), public key {public}")
    nodes = out_dir / "nodes"
    if made.node_keys:
        console.print("\nThe coordinator admits them with:")
        pairs = " ".join(f"--site {n}={pub}" for n, (_, pub) in made.node_keys.items())
        console.print(
            f"  fedsynth server --run-dir RUN --certs {out_dir} {pairs} --config CONFIG.toml"
        )
    else:
        console.print(
            "\nNo hospital keys made here. Put each hospital's public key (from `fedsynth "
            f"keygen`) in {nodes}/ as <site>.pub: `fedsynth server --certs {out_dir}` admits "
            "every one."
        )
        console.print(f"  fedsynth server --run-dir RUN --certs {out_dir} --config CONFIG.toml")
    console.print("Each hospital starts its daemon with:")
    console.print(
        f"  fedsynth client --data-dir DATA --superlink HOST:9092 --ca {made.ca_cert} "
        "--key <its .key file> --device cuda:0"
    )


def keygen_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the key pair (created).")],
    site: Annotated[str, typer.Option(help="This hospital's name in the consortium.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Make this hospital's node key pair; only the public half (.pub) goes to the coordinator."""
    if not SITE_NAME.match(site):
        fail(f"--site {site!r}: use letters, digits, '.', '_' or '-' (up to 64 characters)")
    private = out_dir / f"{site}.key"
    if private.exists() and not overwrite:
        fail(f"{private} exists; a new key means registering again (--overwrite to replace it)")
    private, public = make_node_key(out_dir, site)
    console.print(f"private key (stays here, mode 0600): {private}")
    console.print(f"public key (send to the coordinator): {public}")
    console.print(
        f"The coordinator admits it with: fedsynth server ... --site {site}=<path to {public.name}>"
    )


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_status(status: RunStatus, now: float | None = None) -> None:
    """``fedsynth status`` for people: the state line, the rounds, one row per site."""
    now = time.time() if now is None else now
    console.print(
        f"[bold]{status.run_dir}[/bold]: {status.direction}, {status.strategy}, "
        f"{status.rounds} rounds"
    )
    state = status.state + (f" round {status.round}" if status.round else "")
    if status.detail:
        state += f": {status.detail}"
    if status.since is not None and status.state not in FINAL_STATES:
        state += f" (for {_duration(now - status.since)})"
    if status.running is not None and status.state not in FINAL_STATES:
        state += "; coordinator running" if status.running else "; coordinator not running"
    console.print(f"state: {state}")
    if status.waiting_for:
        console.print(f"waiting for: {', '.join(status.waiting_for)}")
    if status.online:
        console.print(f"online: {', '.join(status.online)}")
    if status.delta is not None:
        unit = {
            "patient": "per patient (the unit: every session of one subject at one hospital)",
            "example": "per training slice (slice-level DP: no guarantee for a whole patient)",
            "site": "per hospital (site-level DP on each hospital's whole participation)",
        }.get(status.privacy_unit or "", "")
        console.print(
            f"privacy: epsilon below is cumulative per site, at delta {status.delta:g}, {unit}"
        )
    timing = f"rounds complete: {status.completed}/{status.rounds}"
    if status.round_seconds:
        timing += (
            f"; time per round: median {status.median_round_seconds:.1f} s, last "
            f"{status.round_seconds[-1]:.1f} s"
        )
    remaining = status.remaining_seconds
    if remaining:
        timing += f"; about {_duration(remaining)} left"
    console.print(timing)
    if status.best_line:
        console.print(status.best_line)  # the round to publish, chosen on validation data

    table = Table(
        title=f"Sites ({len(status.sites)} seen). used: rounds whose update was aggregated; "
        "last: the last round it was asked to train in; G: its last generator loss",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    table.add_column("site", no_wrap=True)
    for column in ("used", "last", "G", "train s", "PSNR", "SSIM", "epsilon", "refused"):
        table.add_column(column, justify="right", no_wrap=True)
    for site in status.sites:
        table.add_row(
            site.name,
            str(site.rounds_accepted),
            str(site.last_round or "-"),
            _number(site.train.get("loss_g"), 3),
            _number(site.train.get("seconds"), 1),
            _number(site.evaluation.get("psnr_masked", site.evaluation.get("psnr")), 2),
            _number(site.evaluation.get("ssim_masked", site.evaluation.get("ssim")), 3),
            _number(site.epsilon, 2),
            str(site.rejections),
        )
    console.print(table)
    if status.rejected:
        rejected = Table(title="Refused updates", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("round", "site", "why"):
            rejected.add_column(column)
        for item in status.rejected:
            rejected.add_row(str(item.round), item.site, "; ".join(item.reasons))
        console.print(rejected)
    else:
        console.print("refused updates: none")
    for note in status.notes:
        console.print(f"[yellow]note[/yellow]: {note}")


def status_command(
    run: Annotated[
        Path,
        typer.Option(
            "--run",
            help="The coordinator's run folder (`fedsynth server --run-dir`; for a simulation, "
            "its federated/ folder).",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Where a federated run stands: state and round, sites, metrics, epsilon, rejections."""
    try:
        status = read_status(run)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(status.to_json(), indent=1, sort_keys=True))
    else:
        render_status(status)
