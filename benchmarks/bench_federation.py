"""Federation costs: bytes per round per site, wire precision vs quality, coordinator overhead.

Run from the project root (the figures in BENCHMARKS.md):

    .venv/bin/python -m benchmarks.bench_federation wire --out runs/bench-wire
    .venv/bin/python -m benchmarks.bench_federation overhead --out runs/bench-overhead

``wire`` trains the same federation (cpu-small, phantom sites of 6, 3 and 1 subjects, a held-out
validation site, FedAvg) once per wire precision with the in-process transport, so the only
difference between runs is the precision of the weights on the wire, and once more in float32
with another seed: the run-to-run spread that a precision effect has to exceed to matter. It
prints the bytes each site sends per round, the central PSNR/SSIM on the validation site after
the last round, and how far the final weights are from the float32 run's.

``overhead`` runs a real loopback deployment (``fedsynth server`` with TLS and node auth, three
``fedsynth client`` daemons) and prints, per round, the round's wall time, the slowest site's own
training time and the difference: the coordinator's overhead (message transport, Flower's
per-message ClientApp process start, update checks, aggregation, checkpointing). It also prints
the CPU time the SuperLink used per round (read from /proc while the run goes): the hub every
message and poll passes through, on the same cores as the sites' training here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedsynth.common.config import load_config
from fedsynth.common.flower_processes import free_port
from fedsynth.common.phantom import generate_consortium
from fedsynth.server.certs import make_certificates
from fedsynth.server.coordinator import Coordinator
from fedsynth.server.round_store import round_dir
from fedsynth.simulations.engines.inprocess import InProcessGrid

FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")


def _consortium(out: Path) -> list[Path]:
    if not (out / "site-4").exists():
        generate_consortium(
            out, sites=4, subjects=[6, 3, 1, 2], seed=0, modalities=["T1w", "T2w"], voxel_size=2.0
        )
    return [out / f"site-{i}" for i in (1, 2, 3, 4)]


def wire(out: Path, rounds: int) -> None:
    sites = _consortium(out / "data")
    training, validation = sites[:3], sites[3]
    results = {}
    # float32 with another seed: the run-to-run spread half precision is to be judged against.
    for label, dtype, seed in (
        ("float32", "float32", 0),
        ("float16", "float16", 0),
        ("bfloat16", "bfloat16", 0),
        ("float32 seed 1", "float32", 1),
    ):
        run = out / f"run-{label.replace(' ', '-')}"
        shutil.rmtree(run, ignore_errors=True)
        config = load_config(
            preset="cpu-small",
            overrides=[
                f"federation.rounds={rounds}",
                "federation.min_sites=3",
                "federation.evaluate_sites=false",
                f"federation.wire_dtype={dtype}",
                f"federation.validation_site={validation}",
                f"training.seed={seed}",
            ],
            environ={},
        )
        nodes = {
            i: {"data-dir": str(s), "state-dir": str(run / f"state-{i}")}
            for i, s in enumerate(training, start=1)
        }
        grid = InProcessGrid(nodes, names={i: s.name for i, s in enumerate(training, start=1)})
        start = time.perf_counter()
        summaries = Coordinator(grid, config, run).run()
        seconds = time.perf_counter() - start
        last = summaries[-1]
        results[label] = {
            "bytes_up_per_site": sorted(set(last.bytes_up.values())),
            "bytes_down_per_site": sorted(set(last.bytes_down.values())),
            "central_psnr": last.central.get("psnr_masked"),
            "central_ssim": last.central.get("ssim_masked"),
            "seconds": seconds,
            "weights": load_file(str(round_dir(run, rounds) / "generators.safetensors")),
        }
    reference = results["float32"]["weights"]
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in reference.values()))
    print(f"{rounds} rounds, 3 training sites, validation {validation.name}")
    print("wire            up B/site/round  down B/site/round  PSNR fg  SSIM fg  |w-w32|/|w32|  s")
    for label, r in results.items():
        diff = np.sqrt(
            sum(
                float(np.sum((r["weights"][k].astype(np.float64) - reference[k]) ** 2))
                for k in reference
            )
        )
        print(
            f"{label:15} {r['bytes_up_per_site']!s:16} {r['bytes_down_per_site']!s:18} "
            f"{r['central_psnr']:7.2f} {r['central_ssim']:8.4f} {diff / norm:13.2e} "
            f"{r['seconds']:5.0f}"
        )


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _superlink_cpu_per_round(run: Path, stop: threading.Event, into: list[float]) -> None:
    """Append the SuperLink's cumulative CPU-s each time rounds.jsonl gains a line."""
    seen, last = 0, 0.0
    while not stop.is_set():
        try:
            pid = int((run / "superlink.pid").read_text())
            rows = len((run / "rounds.jsonl").read_text().splitlines())
        except (OSError, ValueError):
            rows, pid = seen, 0
        cpu = _cpu_seconds(pid) if pid else None
        if cpu is not None:
            last = cpu
        while rows > seen:
            into.append(last)
            seen += 1
        stop.wait(0.5)


def overhead(out: Path, rounds: int, *, warm_worker: bool = True) -> None:
    sites = _consortium(out / "data")[:3]
    shutil.rmtree(out / "run", ignore_errors=True)
    certs = make_certificates(out / "certs", ["site-1", "site-2", "site-3"], overwrite=True)
    config = out / "consortium.toml"
    config.write_text(
        'preset = "cpu-small"\n[federation]\n'
        f"rounds = {rounds}\nmin_sites = 3\nevaluate_sites = false\n",
        encoding="utf-8",
    )
    port = free_port()
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    procs = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [FEDSYNTH, *args],
            stdout=(out / log).open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    superlink_cpu: list[float] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=_superlink_cpu_per_round,
        args=(out / "run", stop_sampling, superlink_cpu),
        daemon=True,
    )
    sampler.start()
    try:
        server = start(
            ["server", "--run-dir", str(out / "run"), "--certs", str(out / "certs"),
             "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
            "server.log",
        )  # fmt: skip
        while "submitted" not in (out / "server.log").read_text():
            time.sleep(1)
        for i, site in enumerate(sites, start=1):
            start(
                ["client", "--data-dir", str(site), "--superlink", f"127.0.0.1:{port}",
                 "--ca", str(certs.ca_cert), "--key", str(certs.node_keys[f"site-{i}"][0]),
                 "--state-dir", str(out / f"state-{i}"), "--runtime-port", str(free_port()),
                 *([] if warm_worker else ["--no-warm-worker"])],
                f"site-{i}.log",
            )  # fmt: skip
        if server.wait(3600) != 0:
            raise SystemExit((out / "server.log").read_text()[-3000:])
    finally:
        stop_sampling.set()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
    lines = (out / "run" / "rounds.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    # CPU-s the SuperLink spent in each round (its first: since it started); the sampler may
    # have missed the last round's line if the SuperLink stopped right after it.
    spent = [b - a for a, b in zip([0.0, *superlink_cpu], superlink_cpu, strict=False)]
    spent += [float("nan")] * (len(rows) - len(spent))
    print("round  wall s  slowest site s  overhead s  SuperLink CPU-s  up B/site")
    for r, cpu in zip(rows, spent, strict=False):
        print(
            f"{r['round']:5} {r['seconds']:7.1f} {r['slowest_site_seconds']:15.1f} "
            f"{r['overhead_seconds']:11.1f} {cpu:16.1f}  {sorted(set(r['bytes_up'].values()))}"
        )
    later = [r["overhead_seconds"] for r in rows[1:]] or [rows[0]["overhead_seconds"]]
    walls = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    print(
        f"median overhead, rounds 2-{len(rows)}: {statistics.median(later):.1f} s, "
        f"{statistics.median(o / w for o, w in zip(later, walls, strict=True)):.1%} of the round"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["wire", "overhead"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="overhead: the daemons start a Flower ClientApp process per message",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "wire":
        wire(args.out, args.rounds)
    else:
        overhead(args.out, args.rounds, warm_worker=not args.no_warm_worker)


if __name__ == "__main__":
    main()
