"""How a simulation grows with the number of simulated hospitals: time and peak memory.

Run from the project root (the figures in BENCHMARKS.md):

    .venv/bin/python -m benchmarks.bench_simulation scale --sites 4 16 50 --out runs/bench-scale

Each size runs ``fedsynth simulate``'s experiment with a tiny model (8 filters, one residual
block, 32x32 slices), one phantom subject per site, four rounds of two local steps, no baselines and
no held-out subjects: what is measured is the Flower simulation engine (Ray) with N SuperNodes,
the coordinator and the per-round bookkeeping. Memory is the peak, sampled every 0.5 s, of the
proportional set size (PSS: shared pages divided among the processes sharing them) summed over
this process and every process it started (SuperLink, the simulation's ServerApp, Ray's workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from fedsynth.simulations.engines.inprocess import tiny_config
from fedsynth.simulations.experiment import run_experiment


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="utf-8").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    """PSS of ``root`` and all its descendants (MB)."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo += tree.get(pid, [])
    return total / 1024


class PeakMemory:
    """Samples :func:`tree_pss_mb` of this process in a thread; ``peak`` in MB."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scale(sizes: list[int], out: Path, rounds: int) -> None:
    rows = []
    for n in sizes:
        folder = out / f"sites-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        config = tiny_config(
            f"name=scale-{n}",
            f"simulation.num_sites={n}",
            f"simulation.subjects=[{', '.join(['1'] * n)}]",
            "simulation.phantom_voxel_mm=4",
            "simulation.holdout_subjects=0",
            "simulation.baselines=[]",
            "simulation.samples=false",
            f"federation.rounds={rounds}",
            "federation.local_steps=2",
            f"federation.min_sites={n}",
            "federation.evaluate_sites=false",
        )
        start = time.perf_counter()
        with PeakMemory() as memory:
            run_experiment(config, folder=folder, echo=lambda _: None)
        wall = time.perf_counter() - start
        phases = json.loads((folder / "phases.json").read_text())["done"]
        per_round = [
            json.loads(line)["seconds"]
            for line in (folder / "federated" / "rounds.jsonl").read_text().splitlines()
            if line
        ]
        row = {
            "sites": n,
            "wall_s": wall,
            "phantom_and_split_s": phases["split"],
            "federated_s": phases["federated"],
            # Round 1 also starts Ray and preprocesses every site: the steady state is after it.
            "first_round_s": per_round[0],
            "round_s_median": statistics.median(per_round[1:] or per_round),
            "peak_pss_mb": memory.peak,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print("| sites | whole run | phantom + split | federated phase | round 1 | later rounds "
          "(median) | per site per round | peak memory (PSS) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['sites']} | {row['wall_s']:.0f} s | {row['phantom_and_split_s']:.0f} s | "
            f"{row['federated_s']:.0f} s | {row['first_round_s']:.1f} s | "
            f"{row['round_s_median']:.1f} s | "
            f"{row['round_s_median'] / row['sites']:.2f} s | {row['peak_pss_mb'] / 1024:.2f} GB "
            f"({row['peak_pss_mb'] / base['peak_pss_mb']:.2f}x) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    grow = sub.add_parser("scale")
    grow.add_argument("--sites", type=int, nargs="+", default=[4, 16, 50])
    grow.add_argument("--rounds", type=int, default=4)
    grow.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    scale(args.sites, args.out, args.rounds)


if __name__ == "__main__":
    main()
