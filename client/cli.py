"""Hospital-side commands: ``client`` (the federation daemon) and ``train-local`` (baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedsynth.client.daemon import INSECURE_WARNING, ClientOptions, run_supernode, supernode_command
from fedsynth.client.local import train_local
from fedsynth.common.checkpoint import CheckpointError
from fedsynth.common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from fedsynth.common.data.errors import SiteDataError

console = Console()


def train_local_command(
    site: Annotated[
        list[Path],
        typer.Option(
            "--site", help="A site folder; repeat to pool several (centralized baseline)."
        ),
    ],
    direction: Annotated[
        str | None, typer.Option("--direction", "-d", help="e.g. T1w->T2w (or T1w:T2w).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name (folder under output_dir).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the run folder's saved trainer state.")
    ] = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Train a CycleGAN without federation: one --site is the local-only baseline, several the
    pooled (centralized) one. Writes the checkpoint, metrics.jsonl and a paired evaluation."""
    extra = list(overrides or [])
    if direction is not None:
        extra.append(f"data.direction={direction}")
    if name is not None:
        extra.append(f"name={name}")
    run = resolve_config(config, preset, extra)
    try:
        result = train_local(site, run, resume=resume, progress=True)
    except (SiteDataError, CheckpointError, ValueError) as exc:
        fail(exc, 1)
    console.print(f"checkpoint: {result.checkpoint}")
    for report in result.evaluations:
        table = Table(title=f"{report.site}: {report.direction} (paired, mean of subjects)")
        for column in ("PSNR fg", "SSIM fg", "MAE fg", "k-space low/mid/high"):
            table.add_column(column)
        m = report.mean
        table.add_row(
            f"{m.get('psnr_masked', float('nan')):.2f} dB",
            f"{m.get('ssim_masked', float('nan')):.4f}",
            f"{m.get('mae_masked', float('nan')):.4f}",
            f"{m.get('kspace_low', float('nan')):.3f} / {m.get('kspace_mid', float('nan')):.3f}"
            f" / {m.get('kspace_high', float('nan')):.3f}",
        )
        console.print(table)


def client_command(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="This hospital's BIDS folder.")],
    superlink: Annotated[str, typer.Option(help="The coordinator, HOST:PORT.")],
    ca: Annotated[
        Path | None, typer.Option(help="The consortium's ca.crt (verifies the coordinator).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="This site's private key (from `fedsynth certs`).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda:0, cpu or auto (default: the coordinator's).")
    ] = None,
    state_dir: Annotated[
        Path, typer.Option(help="Where this site keeps its own networks, optimisers and cache.")
    ] = Path("fedsynth-state"),
    audit_log: Annotated[
        Path | None, typer.Option(help="Append an outline of every reply sent (JSON lines).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no node authentication: loopback tests only.")
    ] = False,
    runtime_port: Annotated[
        int,
        typer.Option(
            help="Local port of the SuperNode's app API (change it when several "
            "daemons share one machine)."
        ),
    ] = 9094,
    max_epsilon: Annotated[
        float | None,
        typer.Option(
            help="This hospital's own privacy cap: refuse any round without DP-SGD at the site, "
            "or one that would take its epsilon past this (whatever the coordinator asks)."
        ),
    ] = None,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Train without the scans that cannot be used (each is named in this log); "
            "without it, the site answers each round with 'unusable files' until they are "
            "fixed or removed, and stays connected.",
        ),
    ] = False,
    warm_worker: Annotated[
        bool,
        typer.Option(
            help="Serve every message from one ClientApp worker that imports fedsynth once "
            "(client/worker.py); --no-warm-worker starts a fresh Flower ClientApp process per "
            "message instead (slower; for comparison or if the worker misbehaves).",
        ),
    ] = True,
    fault: Annotated[
        str | None,
        typer.Option(hidden=True, help="Testing only: corrupt updates (nan or shape)."),
    ] = None,
) -> None:
    """Start this hospital's daemon: a Flower SuperNode that trains on --data-dir when asked."""
    options = ClientOptions(
        data_dir=data_dir,
        superlink=superlink,
        state_dir=state_dir,
        device=device,
        root_certificates=ca,
        private_key=key,
        insecure=insecure,
        audit_log=audit_log,
        fault=fault,
        runtime_port=runtime_port,
        max_epsilon=max_epsilon,
        skip_bad=skip_bad,
        warm_worker=warm_worker,
    )
    _run_daemon(options)


def _run_daemon(options: ClientOptions) -> None:
    """Check the options (a wrong path fails here, with the path), then run the SuperNode."""
    if options.insecure:
        Console(stderr=True).print(f"[bold red]WARNING[/bold red] {INSECURE_WARNING}")
    try:
        supernode_command(options)
    except (ValueError, SiteDataError) as exc:
        fail(exc)
    console.print(f"connecting to {options.superlink} with data from {options.data_dir}")
    code = run_supernode(options, echo=lambda line: typer.echo(line, err=True))
    if code:
        raise typer.Exit(code)
