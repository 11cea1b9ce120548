"""Hospital-side commands: ``train-local`` (local-only or pooled baseline training)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.local import train_local
from common.checkpoint import CheckpointError
from common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from common.data.errors import SiteDataError

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
