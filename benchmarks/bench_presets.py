"""Choosing the CPU preset on the sites' own validation data (issue 16), never on a test site.

Run from the project root (the figures in BENCHMARKS.md, "Choosing cpu-small"):

    .venv/bin/python -m benchmarks.bench_presets --out runs/presets

Every candidate is a set of overrides on the ``cpu-small`` preset. Each trains one pooled model
(``train-local`` over every site, the centralised upper bound of a federation) on the training part
of the real sites: ``brain-mri/site-a..d`` and the raw clinical ``site-e``. Each site keeps its
validation part out (``data.validation_fraction``, :mod:`fedsynth.common.data.validation`), and the
model is scored there: the epoch chosen by that validation score (``checkpoint-best``), in the
source scan's mask. The naive baselines (constant, histogram matching, lookup table), fitted on the
same training parts' statistics, are scored on the same validation slices. No test site is read: the
study (``benchmarks.study_real``) scores what this chooses on left-out sites.

Prints one row per candidate and writes ``results.json`` in ``--out``; finished candidates are
reused when the command runs again.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.client.local import train_local, training_sites
from fedsynth.common.baselines import IntensityStats, fit_baselines, site_statistics
from fedsynth.common.config import RunConfig, load_config
from fedsynth.common.data.validation import validation_pairs
from fedsynth.common.evaluation import evaluate_pairs, evaluate_predictor
from fedsynth.common.io import atomic_write_text
from fedsynth.common.synthesis import Synthesizer
from fedsynth.common.training.data import load_sites

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SITES = (
    DATA / "brain-mri" / "site-a",
    DATA / "brain-mri" / "site-b",
    DATA / "brain-mri" / "site-c",
    DATA / "brain-mri" / "site-d",
    DATA / "brain-mri-clinical" / "site-e",
)

# name -> overrides of cpu-small. "previous" is cpu-small's training as it was before issue 16:
# unpaired CycleGAN with domain B slightly misaligned and R on; R now never sees an unpaired
# example, so it stays at the identity there (the old R loss on unrelated slices is gone).
CANDIDATES: dict[str, list[str]] = {
    "previous": [
        "data.pairing=unpaired",
        "data.misalignment=slight",
        "training.registration=on",
    ],
    "weak-resnet": [],
    "weak-resnet-prior": ["model.intensity_prior=33"],
    "weak-unet-prior": ["model.generator=unet", "model.unet_depth=4", "model.intensity_prior=33"],
    "weak-unet-prior-gamma": [
        "model.generator=unet",
        "model.unet_depth=4",
        "model.intensity_prior=33",
        "data.augment_gamma=0.3",
    ],
    "weak-unet-prior-ngf32": [
        "model.generator=unet",
        "model.unet_depth=4",
        "model.intensity_prior=33",
        "model.ngf=32",
    ],
    "weak-unet-prior-16-epochs": [
        "model.generator=unet",
        "model.unet_depth=4",
        "model.intensity_prior=33",
        "training.epochs=16",
        "training.decay_epochs=8",
    ],
    "weak-unet-prior-96px-2mm": [
        "model.generator=unet",
        "model.unet_depth=4",
        "model.intensity_prior=33",
        "data.image_size=96",
        "data.spacing_mm=[2.0,2.0,2.0]",
    ],
}


def weighted(values: Sequence[tuple[float, int]]) -> float:
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else float("nan")


def run_candidate(
    name: str, overrides: list[str], out: Path, sites: Sequence[Path], extra: list[str]
) -> dict[str, Any]:
    config: RunConfig = load_config(
        preset="cpu-small",
        overrides=[f"name={name}", f"output_dir={out}", *extra, *overrides],
        environ={},
    )
    start = time.perf_counter()
    run = train_local(list(sites), config, evaluate=False)
    seconds = time.perf_counter() - start
    checkpoint = run.best_checkpoint or run.checkpoint
    translate = Synthesizer(checkpoint, device="cpu").translate_slices

    loaded = training_sites(load_sites(list(sites), config, config.run_dir / "cache"), config)
    stats = IntensityStats.merge_all(site_statistics(s) for s in loaded)
    baselines, _ = fit_baselines(stats)
    rows: dict[str, list[tuple[float, float, int]]] = {"model": []}
    for site in loaded:
        pairs = validation_pairs(site)
        if not pairs:
            continue
        slices = sum(len(p) for _, p in pairs)
        report = evaluate_pairs(site.name, config.data.direction, pairs, translate)
        rows["model"].append((report.mean["psnr_masked"], report.mean["ssim_masked"], slices))
        for baseline, predict in baselines.items():
            scored = evaluate_predictor(site.name, config.data.direction, pairs, predict)
            rows.setdefault(baseline, []).append(
                (scored.mean["psnr_masked"], scored.mean["ssim_masked"], slices)
            )
    result: dict[str, Any] = {
        "overrides": overrides,
        "seconds": seconds,
        "steps": int(run.history[-1]["step"]) if run.history else 0,
        "best_epoch": run.best_epoch,
        "epochs": config.training.epochs,
    }
    for arm, values in rows.items():
        result[arm] = {
            "psnr_masked": weighted([(p, n) for p, _, n in values]),
            "ssim_masked": weighted([(s, n) for _, s, n in values]),
            "per_site": [[p, s, n] for p, s, n in values],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/presets"))
    parser.add_argument("--only", action="append", help="Candidate names (default: all).")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="for every candidate (its own overrides win)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for name, overrides in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        if name in results and results[name].get("extra") == args.extra:
            continue
        results[name] = run_candidate(name, overrides, args.out, SITES, args.extra)
        results[name]["extra"] = args.extra
        results[name]["machine"] = f"{platform.processor() or platform.machine()}, "
        results[name]["machine"] += f"{torch.get_num_threads()} threads"
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    print(f"{'candidate':<28} {'s':>6} {'best/ep':>8} {'model dB/SSIM':>15} {'LUT dB/SSIM':>13}")
    for name, row in results.items():
        lut = row.get("lookup table", {})
        print(
            f"{name:<28} {row['seconds']:6.0f} {row['best_epoch']!s:>4}/{row['epochs']:<3} "
            f"{row['model']['psnr_masked']:7.2f}/{row['model']['ssim_masked']:.3f} "
            f"{lut.get('psnr_masked', np.nan):6.2f}/{lut.get('ssim_masked', np.nan):.3f}"
        )


if __name__ == "__main__":
    main()
