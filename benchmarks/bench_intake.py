"""Scan intake benchmark: wall time and peak memory of reading a damaged folder and a big site.

Run from the project root:

    .venv/bin/python -m benchmarks.bench_intake [--out runs/bench-intake] [--subjects 5,10,20]

Each measurement is one ``fedsynth`` command in a child process of its own (the numbers include
the CLI's start-up and imports), timed from outside and read back as the child's peak resident
set size (``getrusage(RUSAGE_CHILDREN)`` after it ends). Measured:

- ``inspect`` on a site holding every damaged kind of ``tests/intake.py`` beside one good pair,
  with a real-sized gzip bomb: a file whose header claims 1536^3 int16 (7.2 GB) and whose
  payload is that many compressed zeros (tens of MB on disk);
- ``inspect`` and one local epoch of ``train-local`` (the work of one round at that site:
  loading and preprocessing every scan, then training) on one-site phantoms of a growing number
  of subjects at 1 mm, to show that memory does not grow with the number of subjects.

Prints a Markdown table; copy it to BENCHMARKS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDSYNTH = [sys.executable, "-m", "fedsynth.cli"]


def measure(argv: list[str], cwd: Path) -> tuple[float, float, int]:
    """Run one command in a fresh child; (wall seconds, its peak RSS in MB, exit code)."""
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    # A fresh grandparent per command: RUSAGE_CHILDREN is the maximum over every child waited
    # for, so each command runs under its own short-lived Python that reports its child's peak.
    probe = (
        "import resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL).returncode\n"
        "seconds = time.perf_counter() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(seconds, peak, code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    seconds, peak_kb, code = done.stdout.split()
    return float(seconds), int(peak_kb) / 1024, int(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-intake"))
    parser.add_argument("--subjects", default="5,10,20", help="phantom site sizes")
    parser.add_argument("--preset", default="cpu-small")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from tests.intake import write_bad_site

    rows: list[tuple[str, float, float, int]] = []
    bad = out / "damaged"
    write_bad_site(bad, bomb_payload=1536**3 * 2)
    bomb = next(bad.glob("sub-bomb/anat/*"))
    bomb_mb = bomb.stat().st_size / 2**20
    preset = ["--preset", args.preset]
    for label, extra in (("", []), (" --skip-bad", ["--skip-bad"])):
        seconds, peak, code = measure([*FEDSYNTH, "inspect", str(bad), *preset, *extra], ROOT)
        what = f"inspect{label}: damaged folder (21 bad files, 1 good pair)"
        rows.append((what, seconds, peak, code))

    for count in (int(n) for n in args.subjects.split(",")):
        site_root = out / f"phantom-{count}"
        subprocess.run(
            [*FEDSYNTH, "phantom", str(site_root), "--sites", "1", "--subjects", str(count),
             "--voxel-mm", "1", "--modalities", "T1w,T2w", "--seed", "0"],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        site = next(p for p in site_root.iterdir() if p.name.startswith("site-"))
        seconds, peak, code = measure([*FEDSYNTH, "inspect", str(site), *preset], ROOT)
        rows.append((f"inspect: phantom site, {count} subjects at 1 mm", seconds, peak, code))
        seconds, peak, code = measure(
            [*FEDSYNTH, "train-local", "--site", str(site), *preset,
             "--set", "training.epochs=1", "--set", "training.decay_epochs=0",
             "--set", f"output_dir={out / 'runs'}", "--name", f"subjects-{count}"],
            ROOT,
        )  # fmt: skip
        rows.append((f"train-local, 1 epoch: phantom site, {count} subjects", seconds, peak, code))

    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; bomb file {bomb_mb:.1f} MB on disk\n")  # fmt: skip
    print("| command | wall s | peak RSS (MB) | exit |")
    print("|---|---|---|---|")
    for label, seconds, peak, code in rows:
        print(f"| {label} | {seconds:.1f} | {peak:.0f} | {code} |")


if __name__ == "__main__":
    main()
