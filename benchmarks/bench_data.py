"""Data-layer benchmark: phantom generation, cold preprocessing and cache hits.

Run from the project root:

    .venv/bin/python -m benchmarks.bench_data [--repeats 5] [--out runs/bench-data]

Prints a Markdown table of medians (seconds) measured in this one run; copy it to BENCHMARKS.md
with the machine it ran on. Real scans are read from ../shared/data when present.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from fedsynth.common.config import load_config
from fedsynth.common.data.preprocess import SliceCache, preprocess_scan
from fedsynth.common.modalities import Modality
from fedsynth.common.phantom import generate_consortium

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-mri"


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-data"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    rows: list[tuple[str, float]] = []

    for voxel in (2.0, 1.0):
        target = args.out / f"phantom-{voxel:g}mm"
        start = time.perf_counter()
        generate_consortium(target, sites=4, subjects=[12, 6, 3, 1], seed=0, voxel_size=voxel)
        rows.append(
            (
                f"phantom 4 sites / 22 subjects / 6 contrasts at {voxel:g} mm (once)",
                time.perf_counter() - start,
            )
        )

    scan = SHARED / "site-a/sub-gli001/anat/sub-gli001_T1w.nii.gz"
    if scan.exists():
        for preset in ("cpu-small", "gpu-paper"):
            data = load_config(preset=preset, environ={}).data
            cold = median_seconds(
                lambda d=data: preprocess_scan(scan, Modality.T1W, d), args.repeats
            )
            cache = SliceCache(args.out / f"cache-{preset}")
            cache.load(scan, Modality.T1W, data)
            warm = median_seconds(
                lambda c=cache, d=data: c.load(scan, Modality.T1W, d), args.repeats
            )
            rows.append((f"preprocess 240x240x155 T1w, {preset}, cold (median)", cold))
            rows.append((f"preprocess 240x240x155 T1w, {preset}, cache hit (median)", warm))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print("| measurement | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
