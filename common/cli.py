"""Command-line pieces both roles use: ``inspect``, ``phantom`` and ``config``.

The ``fedsynth`` command itself is assembled in :mod:`fedsynth.cli.main`, the one package allowed
to import every role.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fedsynth.common.config import (
    ConfigError,
    RunConfig,
    available_presets,
    dumps_config,
    load_config,
)
from fedsynth.common.data.errors import SiteDataError
from fedsynth.common.data.inspect import SiteReport, inspect_site
from fedsynth.common.modalities import Direction, Modality

if TYPE_CHECKING:
    from fedsynth.common.evaluation import EvaluationReport

logger = logging.getLogger(__name__)
# Pipes and CI logs get a fixed, comfortable width instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 132)
errors = Console(stderr=True, soft_wrap=True)  # one line per error: grep-able in logs

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML file with \\[data], \\[model], \\[training], ... tables."
    ),
]
PresetOption = Annotated[
    str | None, typer.Option("--preset", "-p", help="Preset: cpu-small or gpu-paper.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one value: section.field=value (repeatable)."),
]
CheckpointOption = Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]


def fail(problem: object, code: int = 1) -> NoReturn:
    """Print ``error: <problem>`` on one line of stderr and exit with ``code``."""
    errors.print(f"[red]error:[/red] {problem}", highlight=False)
    raise typer.Exit(code)


def resolve_config(
    config: Path | None, preset: str | None, overrides: list[str] | None
) -> RunConfig:
    """Load the configuration or exit with code 2 and the problems, one per line."""
    try:
        return load_config(config, preset=preset, overrides=overrides or [])
    except ConfigError as exc:
        fail(exc, 2)


# --------------------------------------------------------------------------- inspect


def _fmt_range(values: tuple[float, float, float, float] | None) -> str:
    if values is None:
        return "-"
    lo, _, _, hi = values
    return f"{lo:.4g}..{hi:.4g}"


def _fmt_directions(directions: list[Direction]) -> list[str]:
    lines = []
    for source in Modality:
        targets = [d.target.value for d in directions if d.source is source]
        if targets:
            lines.append(f"  {source.value} -> {', '.join(targets)}")
    return lines


def render_site_report(report: SiteReport) -> None:
    count = len(report.subjects)
    table = Table(
        title=f"{report.root} ({report.layout} layout, {count} subject{'s' if count != 1 else ''})"
    )
    for column in ("subject", "modality", "shape", "spacing mm", "orient", "range", "slices"):
        table.add_column(column, no_wrap=True)
    table.add_column("status")
    order = list(Modality)
    for r in sorted(report.scans, key=lambda r: (r.scan.subject, order.index(r.scan.modality))):
        subject = r.scan.subject + (f" {r.scan.session}" if r.scan.session else "")
        shape = "x".join(str(n) for n in r.shape) if r.shape else "-"
        spacing = "x".join(f"{s:.3g}" for s in r.spacing) if r.spacing else "-"
        status = "[green]ok[/green]" if r.ok else f"[red]{r.error}[/red]"
        table.add_row(
            subject,
            r.scan.modality.value,
            shape,
            spacing,
            r.axcodes or "-",
            _fmt_range(r.intensity),
            str(r.usable_slices) if r.usable_slices is not None else "-",
            status,
        )
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if report.bad:
        console.print(f"[red]{len(report.bad)} unusable file(s):[/red]")
        for r in report.bad:
            console.print(f"  {r.scan.path}: {r.error}", highlight=False)
            if r.hint:
                console.print(f"    hint: {r.hint}", highlight=False)
    if report.directions:
        console.print("[bold]Verdict:[/bold] this site can train")
        for line in _fmt_directions(report.directions):
            console.print(line, highlight=False)
        paired = report.paired_directions
        if paired == report.directions:
            console.print(
                "and evaluate every one of them on pairs (sessions that hold both contrasts)"
            )
        elif paired:
            console.print("and evaluate on true pairs:")
            for line in _fmt_directions(paired):
                console.print(line, highlight=False)
        else:
            console.print("no subject has two usable modalities: no paired evaluation here")
        console.print("Training examples per direction (weakly paired: a session's contrasts at")
        console.print("one slice position; unpaired: sessions missing one of the two):")
        for found in report.examples:
            console.print(
                f"  {found.direction}: {found.paired_examples} weakly paired "
                f"({found.paired_sessions} session{'s' if found.paired_sessions != 1 else ''}), "
                f"{found.unpaired_examples} unpaired",
                highlight=False,
            )
    else:
        console.print(
            "[bold red]Verdict:[/bold red] this site cannot train any direction "
            "(it needs two usable modalities)"
        )


def inspect_command(
    site_dir: Annotated[Path, typer.Argument(help="A hospital's BIDS or plain modality folder.")],
    direction: Annotated[
        str | None,
        typer.Option("--direction", "-d", help="Check one direction, e.g. T1w->T2w."),
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Exit 0 despite unusable files (they are listed).")
    ] = False,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Show each scan (shape, spacing, orientation, intensities, usable slices) and a verdict.

    Exit codes: 0 usable; 1 unusable files (without --skip-bad) or the requested direction
    cannot train; 2 bad arguments.
    """
    run = resolve_config(config, preset, overrides)
    wanted: Direction | None = None
    if direction is not None:
        try:
            wanted = Direction.parse(direction)
        except ValueError as exc:
            fail(f"--direction: {exc}", 2)
    try:
        with console.status("inspecting") as status:
            report = inspect_site(
                site_dir,
                run.data,
                progress=lambda scan: status.update(f"reading {scan.path.name}"),
            )
    except SiteDataError as exc:
        fail(exc, 1)
    render_site_report(report)
    if wanted is not None and wanted not in report.directions:
        present = sorted({r.scan.modality.value for r in report.scans if r.ok})
        usable = ", ".join(present) or "none"
        fail(f"{site_dir} cannot train {wanted}: usable modalities are {usable}")
    if report.bad and not skip_bad:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- phantom


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, found {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise typer.BadParameter(f"every site needs at least one subject, found {text!r}")
    return counts


def phantom_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write site-1 ... site-N into.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.", min=1)] = 4,
    subjects: Annotated[
        str, typer.Option(help="Subjects per site, comma-separated (one number per site).")
    ] = "12,6,3,1",
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    voxel_mm: Annotated[
        float,
        typer.Option("--voxel-mm", help="Isotropic grid of the anatomy (mm).", min=0.5, max=8),
    ] = 1.0,
    modalities: Annotated[
        str, typer.Option(help="Comma-separated contrasts to write.")
    ] = "T1w,T2w,FLAIR,PD,ct,pet",
    lesions: Annotated[bool, typer.Option(help="Add ellipsoid lesions with masks.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace site folders a previous phantom run wrote (only those).")
    ] = False,
    exist_ok: Annotated[
        bool,
        typer.Option(
            help="If OUT_DIR already holds these sites with these subject counts, keep them and "
            "succeed (for start-up scripts and compose)."
        ),
    ] = False,
) -> None:
    """Write a consortium of brain-phantom hospitals in BIDS, built from the MNI ICBM152 anatomy.

    Each site has its own scanner (field strength, bias field, noise, intensity scale, slice
    thickness); ground truth (tissue maps, lesion masks, parameters) goes to derivatives/phantom.
    """
    from fedsynth.common.phantom import generate_consortium

    counts = _parse_counts(subjects)
    if len(counts) != sites:
        raise typer.BadParameter(f"--subjects lists {len(counts)} sites but --sites is {sites}")
    try:
        wanted = [Modality.parse(m) for m in modalities.split(",") if m.strip()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if exist_ok and not overwrite:
        found = [len(list((out_dir / f"site-{i}").glob("sub-*"))) for i in range(1, sites + 1)]
        if found == counts:
            console.print(f"kept the phantom sites already in {out_dir} ({subjects} subjects)")
            return
        if any(found):
            fail(
                f"{out_dir} holds phantom sites with {','.join(map(str, found))} subjects, not "
                f"{subjects}: choose another folder or pass --overwrite"
            )
    try:
        with console.status("building phantom") as status:
            paths = generate_consortium(
                out_dir,
                sites=sites,
                subjects=counts,
                seed=seed,
                modalities=wanted,
                voxel_size=voxel_mm,
                lesions=lesions,
                overwrite=overwrite,
                progress=lambda message: status.update(message),
            )
    except (FileExistsError, ValueError) as exc:
        fail(exc, 1)
    for path, count in zip(paths, counts, strict=True):
        console.print(f"wrote {path} ({count} subject{'s' if count > 1 else ''})")


# --------------------------------------------------------------------------- config


def config_command(
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
    list_presets: Annotated[bool, typer.Option("--presets", help="List the presets.")] = False,
) -> None:
    """Print the resolved configuration (defaults < preset < file < FEDSYNTH_* env < --set)."""
    if list_presets:
        for name in available_presets():
            console.print(name)
        return
    run = resolve_config(config, preset, overrides)
    console.print(dumps_config(run), markup=False, highlight=False)


# --------------------------------------------------------------------------- synthesize / evaluate


def synthesize_command(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Source NIfTI volume.")],
    output_path: Annotated[Path, typer.Argument(metavar="OUTPUT", help="NIfTI to write.")],
    checkpoint: CheckpointOption,
    modality: Annotated[
        str | None,
        typer.Option(help="The input's modality when its file name does not say (BIDS suffix)."),
    ] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.", min=1)] = 16,
    bf16: Annotated[
        bool, typer.Option(help="bfloat16 autocast (faster; see BENCHMARKS.md).")
    ] = False,
) -> None:
    """Translate a whole volume with a checkpoint's generator; the output keeps the input's
    shape, affine and orientation. Intensities: HU for CT, a typical training range for MR."""
    from fedsynth.common.checkpoint import CheckpointError
    from fedsynth.common.data.errors import ScanError
    from fedsynth.common.synthesis import Synthesizer

    try:
        declared = Modality.parse(modality) if modality else None
        synthesizer = Synthesizer(checkpoint, device=device, batch_size=batch_size, bf16=bf16)
        result = synthesizer.synthesize(input_path, output_path, modality=declared)
    except (CheckpointError, ScanError, ValueError) as exc:
        fail(exc, 1)
    console.print(
        f"wrote {result.output} ({synthesizer.direction}, {result.slices} slices, "
        f"{result.seconds:.1f} s; intensities {result.scale.kind} scale "
        f"{result.scale.low:.4g}..{result.scale.high:.4g})",
        highlight=False,
    )


def evaluate_command(
    checkpoint: CheckpointOption,
    site: Annotated[Path, typer.Option("--site", help="Site folder with co-registered pairs.")],
    out: Annotated[
        Path | None,
        typer.Option(help="JSON report (default: <checkpoint>/evaluation-<site>.json)."),
    ] = None,
    device: DeviceOption = "auto",
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Evaluate without the site's unusable scans (logged)."),
    ] = False,
) -> None:
    """Paired evaluation per subject and mean: PSNR, SSIM, MAE (whole and foreground), k-space.

    When the checkpoint carries its training sites' intensity statistics, the naive baselines
    (constant, histogram matching, lookup table) are scored on the same subjects beside it."""
    name, report, has_statistics, skipped = _evaluate_site(checkpoint, site, device, skip_bad)
    console.print(_evaluation_table(name, report))
    if not has_statistics:
        console.print(
            "no naive baselines: the checkpoint carries no intensity statistics of its "
            "training sites (made before fedsynth recorded them)"
        )
    else:
        for baseline, reason in skipped.items():
            console.print(f"{baseline}: not scored ({reason})", highlight=False)
        _print_baseline_gap(report)
    target = out or Path(checkpoint) / f"evaluation-{name}.json"
    report.write(target)
    console.print(f"report: {target}")


def _evaluate_site(
    checkpoint: Path, site: Path, device: str, skip_bad: bool
) -> tuple[str, EvaluationReport, bool, dict[str, str]]:
    """Score the checkpoint (and the naive baselines, when it carries the statistics) on the
    site's pairs: the site's name, the report, whether there were statistics, the baselines
    not scored and why. Exits with code 1 on a bad checkpoint or site."""
    from fedsynth.common.baselines import IntensityStats, fit_baselines
    from fedsynth.common.checkpoint import CheckpointError
    from fedsynth.common.evaluation import add_baselines, evaluate_pairs, site_pairs
    from fedsynth.common.synthesis import Synthesizer

    skipped: dict[str, str] = {}
    try:
        synthesizer = Synthesizer(checkpoint, device=device)
        data = synthesizer.metadata.data
        if skip_bad:
            data = data.model_copy(update={"skip_bad": True})
        name, pairs = site_pairs(site, data)
        report = evaluate_pairs(
            name, str(synthesizer.direction), pairs, synthesizer.translate_slices
        )
        statistics = synthesizer.metadata.baselines
        if statistics is not None:
            fitted, skipped = fit_baselines(IntensityStats.from_dict(statistics))
            add_baselines(report, pairs, fitted)
    except (CheckpointError, SiteDataError, ValueError) as exc:
        fail(exc, 1)
    return name, report, statistics is not None, skipped


_EVALUATION_COLUMNS = (
    ("PSNR", "psnr", ".2f"),
    ("PSNR fg", "psnr_masked", ".2f"),
    ("SSIM", "ssim", ".4f"),
    ("SSIM fg", "ssim_masked", ".4f"),
    ("MAE fg", "mae_masked", ".4f"),
    ("k low", "kspace_low", ".3f"),
    ("k mid", "kspace_mid", ".3f"),
    ("k high", "kspace_high", ".3f"),
)
_LESION_COLUMNS = (("PSNR lesion", "lesion_psnr", ".2f"), ("SSIM lesion", "lesion_ssim", ".4f"))


def _evaluation_table(name: str, report: EvaluationReport) -> Table:
    """One row per subject, the mean, then each naive baseline's mean (title, key, format)."""
    table = Table(title=f"{name}: {report.direction} on true pairs")
    columns = list(_EVALUATION_COLUMNS)
    if any("lesion_psnr" in s.metrics for s in report.subjects):
        columns += _LESION_COLUMNS
    table.add_column("subject")
    table.add_column("slices", justify="right")
    for title, _, _ in columns:
        table.add_column(title, justify="right")

    def row(label: str, slices: str, metrics: dict[str, float]) -> None:
        table.add_row(
            label, slices, *(format(metrics.get(k, float("nan")), f) for _, k, f in columns)
        )

    slices = str(sum(s.slices for s in report.subjects))
    for subject in report.subjects:
        row(subject.subject, str(subject.slices), subject.metrics)
    row("mean", slices, report.mean)
    if report.baselines:
        table.add_section()
        for baseline, scores in report.baselines.items():
            row(f"{baseline} (mean)", slices, scores.mean)
    return table


def _print_baseline_gap(report: EvaluationReport) -> None:
    """Say how far the model is above or below the best naive baseline in masked PSNR."""
    best = max(
        report.baselines,
        key=lambda b: report.baselines[b].mean.get("psnr_masked", float("-inf")),
        default=None,
    )
    if best is not None:
        gap = report.mean.get("psnr_masked", math.nan) - report.baselines[best].mean.get(
            "psnr_masked", math.nan
        )
        if math.isfinite(gap):
            side = "above" if gap >= 0 else "below"
            console.print(
                f"the model is {abs(gap):.2f} dB {side} the best naive baseline ({best}) in "
                "masked PSNR, on the same subjects, slices and mask",
                highlight=False,
            )
