"""Running the whole study, writing its ``results.json`` and report, and the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.study_real.arms import run_fold
from benchmarks.study_real.ct import run_ct
from benchmarks.study_real.figures import ct_grid, mri_grid
from benchmarks.study_real.report import write_report
from benchmarks.study_real.scores import fold_rows, goals, round_curves, summarise
from benchmarks.study_real.settings import (
    DIRECTIONS,
    SETTINGS,
    VARIANTS,
    Study,
    StudyError,
    find_sites,
    open_study,
    slug,
)
from fedsynth.common.flower_processes import FlowerError
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.common.modalities import Direction
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.report import FIGURES_DIR
from fedsynth.simulations.results import RESULTS_NAME

logger = logging.getLogger(__name__)


def compute_seconds(study: Study) -> dict[str, float]:
    """Time spent on each part of the study, from the records its parts keep (so a study run in
    several invocations is counted whole): every experiment's phases, the CT model's epochs."""
    spent: dict[str, float] = {}
    for phases in sorted(study.out.glob("*/fold-*/phases.json")):
        done = json.loads(phases.read_text(encoding="utf-8")).get("done", {})
        spent[str(phases.parent.relative_to(study.out))] = float(sum(done.values()))
    history = study.out / "ct" / "model" / "metrics.jsonl"
    if history.exists():
        lines = history.read_text(encoding="utf-8").splitlines()
        spent["ct"] = float(sum(json.loads(line).get("seconds", 0.0) for line in lines if line))
    return spent


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k != "translate"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_study(study: Study) -> dict[str, Any]:
    start = time.perf_counter()
    for direction in study.directions:
        for fold in study.folds:
            run_fold(study, direction, fold)
        if direction == study.directions[0]:
            for variant in study.variants:
                run_fold(study, direction, study.folds[0], variant)
    results: dict[str, Any] = {
        "settings": study.record()["settings"],
        "overrides": study.overrides,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"torch threads, Python {platform.python_version()}",
        "directions": {},
    }
    figures: dict[str, Any] = {}
    (study.out / FIGURES_DIR).mkdir(exist_ok=True)
    for direction in study.directions:
        per_fold = {fold: fold_rows(study, direction, fold) for fold in study.folds}
        summary = summarise(per_fold)
        results["directions"][direction] = {
            "folds": study.folds,
            "per_fold": per_fold,
            "summary": summary,
            "goals": goals(summary, study.folds[0]),
            "rounds": round_curves(study, direction),
        }
        figures[direction] = {}
        grid = mri_grid(study, direction, study.out / FIGURES_DIR / f"{slug(direction)}.png")
        if grid:
            figures[direction]["grid"] = grid
        if direction == study.directions[0] and study.variants:
            path = study.out / FIGURES_DIR / f"{slug(direction)}-variants.png"
            variants = mri_grid(study, direction, path, variants=True)
            if variants:
                figures[direction]["variants"] = variants
    if study.ct:
        results["ct"] = run_ct(study)
        figures["ct"] = ct_grid(study, results["ct"], study.out / FIGURES_DIR / "t1w-to-ct.png")
    results["seconds"] = time.perf_counter() - start
    results["compute_seconds"] = compute_seconds(study)
    atomic_write_text(
        study.out / RESULTS_NAME, json.dumps(_clean(results), indent=2) + "\n", READABLE
    )
    report = write_report(study, results, figures)
    study.echo(f"study finished in {results['seconds'] / 60:.1f} min; report: {report}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.study_real",
        description="Leave-one-site-out quality study on real multi-site brain MRI (issue 8).",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study-real"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--preset", default="cpu-small", choices=sorted(SETTINGS))
    parser.add_argument(
        "--folds", nargs="+", help="MRI sites to leave out, in order (default: all)"
    )
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS))
    parser.add_argument(
        "--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS, help="on the first fold"
    )
    parser.add_argument("--no-ct", action="store_true", help="skip MRI -> CT")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--overwrite", action="store_true", help="start again in an --out made with other settings"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sites, scored, ct_site = find_sites(args.data)
        folds = args.folds or list(sites)
        unknown = [f for f in folds if f not in sites]
        if unknown:
            raise StudyError(f"--folds {', '.join(unknown)}: not among {', '.join(sites)}")
        directions = [str(Direction.parse(d)) for d in args.directions]
        if not args.no_ct and ct_site is None:
            raise StudyError(f"{args.data}/brain-ct/site-ct not found: pass --no-ct to skip CT")
        study = Study(
            out=args.out,
            data=args.data,
            preset=args.preset,
            overrides=list(args.overrides),
            folds=folds,
            directions=directions,
            variants=list(args.variants),
            ct=not args.no_ct,
            sites=sites,
            scored=scored,
            ct_site=ct_site,
            echo=lambda line: print(line, flush=True),
        )
        study.config(directions[0], "check")  # a bad --set fails here, not an hour in
        open_study(study, overwrite=args.overwrite)
        run_study(study)
    except (StudyError, ValueError) as exc:
        print(f"study_real: {exc}", file=sys.stderr)
        return 2
    except (ExperimentError, FlowerError) as exc:
        print(
            f"study_real: {exc}\nFinished experiments are kept: the same command continues.",
            file=sys.stderr,
        )
        return 1
    return 0
