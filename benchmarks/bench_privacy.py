"""What DP-SGD costs: step time and peak memory against the non-DP step, and quality per epsilon.

Run from the project root (quiet machine, nothing else running):

    .venv/bin/python -m benchmarks.bench_privacy step [--steps 12] [--repeats 3]
    .venv/bin/python -m benchmarks.bench_privacy utility --site runs/phantom/site-1 \\
        --eval runs/phantom/site-1 --eval runs/phantom/site-3 [--epsilon 16 8 4]

``step`` runs each variant (no DP; DP with our grouped-convolution per-sample gradients; DP with
Opacus' own samplers; DP in functorch mode; DP with R; DP with physical batches of 2) in its own
process, in turn, ``--repeats`` times, at the cpu-small size and batch. Each process reports its
median step time and its peak resident memory above what it held before the first step; the
table gives the median over repeats and the ratio to the non-DP step of the same run.

``utility`` trains the local-only model on ``--site`` once without DP and once per epsilon
(delta 1e-5, noise calibrated before training for the planned steps) with identical settings and
seeds, then reports masked PSNR/SSIM on each ``--eval`` site's true pairs. No setting is tuned on
these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "no DP": [],
    "DP, grouped-conv samplers (ours)": ["privacy.enabled=true"],
    "DP, Opacus' samplers (hooks)": ["privacy.enabled=true", "+opacus-samplers"],
    "DP, functorch mode": ["privacy.enabled=true", "privacy.grad_sample_mode=functorch"],
    "DP, physical batches of 2": ["privacy.enabled=true", "privacy.max_physical_batch_size=2"],
    "no DP, with R (misaligned)": ["training.registration=on"],
    "DP, with R (misaligned)": ["privacy.enabled=true", "training.registration=on"],
}


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_variant(overrides: list[str], steps: int) -> dict[str, float]:
    """Time ``steps`` training steps of one variant in this process; measure its memory."""
    from fedsynth.common.config import load_config
    from fedsynth.common.privacy.plan import plan_noise
    from fedsynth.common.training.trainer import CycleGANTrainer

    opacus_samplers = "+opacus-samplers" in overrides
    overrides = [o for o in overrides if not o.startswith("+")]
    config = load_config(
        preset="cpu-small", overrides=["privacy.noise_multiplier=1.0", *overrides], environ={}
    )
    size, batch = config.data.image_size, config.training.batch_size
    trainer = CycleGANTrainer(
        config.model,
        config.training,
        size,
        registration=config.registration_enabled,
        privacy=config.privacy,
    )
    if config.privacy.enabled:
        if opacus_samplers:  # keep Opacus' own registry (unfold for Conv2d, functorch otherwise)
            import fedsynth.common.privacy.dp_sgd

            fedsynth.common.privacy.dp_sgd.install_grad_samplers = lambda: None  # type: ignore[assignment]
        trainer.make_private(
            plan_noise(
                config.privacy,
                examples=400,
                batch_size=batch,
                networks=len(trainer.nets),
                steps_per_round=None,
                epochs_per_round=1,
                rounds=1,
            )
        )
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "a": torch.rand(batch, 1, size, size, generator=generator) * 2 - 1,
            "b": torch.rand(batch, 1, size, size, generator=generator) * 2 - 1,
        }
        for _ in range(3)
    ]
    trainer.train_step(batches[0])  # warm-up (allocator, first-call costs)
    before = _rss_mb()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        trainer.train_step(batches[i % 3])
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"median_s": statistics.median(times), "peak_mb": peak, "working_mb": peak - before}


def bench_step(steps: int, repeats: int) -> None:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, overrides in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_privacy", "_one", "--steps", str(steps),
                 *[f"--set={o}" for o in overrides]],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    machine = platform.processor() or platform.machine()
    print(
        f"cpu-small, batch 4, 64x64, {steps} steps x {repeats} repeats; torch "
        f"{torch.__version__}, {os.cpu_count()} cores, {machine}"
    )
    base = statistics.median(r["median_s"] for r in results["no DP"])
    base_r = statistics.median(r["median_s"] for r in results["no DP, with R (misaligned)"])
    print("| variant | step (median) | vs no DP | peak RSS | working memory |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        t = statistics.median(r["median_s"] for r in runs)
        ref = base_r if "with R" in name else base
        peak = statistics.median(r["peak_mb"] for r in runs)
        working = statistics.median(r["working_mb"] for r in runs)
        print(f"| {name} | {t:.3f} s | {t / ref:.2f}x | {peak:.0f} MB | {working:.0f} MB |")


def bench_utility(site: Path, evals: list[Path], epsilons: list[float], extra: list[str]) -> None:
    from fedsynth.client.local import train_local
    from fedsynth.common.config import load_config
    from fedsynth.common.evaluation import evaluate_pairs, site_pairs
    from fedsynth.common.models import define_cyclegan
    from fedsynth.common.synthesis import Synthesizer

    rows = []
    base = load_config(preset="cpu-small", overrides=list(extra), environ={})
    untrained = define_cyclegan(base.model, base.data.image_size, seed=base.training.seed)["g_ab"]

    @torch.no_grad()
    def translate_untrained(slices: np.ndarray) -> np.ndarray:
        return untrained.eval()(torch.from_numpy(slices)[:, None])[:, 0].numpy()

    scores0 = {}
    for eval_site in evals:
        name, pairs = site_pairs(eval_site, base.data)
        mean = evaluate_pairs(name, base.data.direction, pairs, translate_untrained).mean
        scores0[name] = (mean["psnr_masked"], mean["ssim_masked"])
    print(json.dumps({"epsilon": "untrained", "scores": scores0}), flush=True)
    for epsilon in [None, *epsilons]:
        tag = "inf" if epsilon is None else f"{epsilon:g}"
        privacy = (
            []
            if epsilon is None
            else ["privacy.enabled=true", f"privacy.target_epsilon={epsilon}", "privacy.delta=1e-5"]
        )
        config = load_config(
            preset="cpu-small",
            overrides=[f"name=privacy-eps-{tag}", *extra, *privacy],
            environ={},
        )
        start = time.perf_counter()
        run = train_local([site], config, evaluate=False)
        seconds = time.perf_counter() - start
        meta = json.loads((run.checkpoint / "checkpoint.json").read_text(encoding="utf-8"))
        translate = Synthesizer(run.checkpoint, device="cpu").translate_slices
        scores = {}
        for eval_site in evals:
            name, pairs = site_pairs(eval_site, config.data)
            mean = evaluate_pairs(name, config.data.direction, pairs, translate).mean
            scores[name] = (mean["psnr_masked"], mean["ssim_masked"])
        spent = meta.get("privacy") or {}
        rows.append((tag, spent, scores, seconds, int(run.history[-1]["step"])))
        print(
            json.dumps({"epsilon": tag, "privacy": spent, "scores": scores, "s": seconds}),
            flush=True,
        )
    names = list(rows[0][2])
    print("| target epsilon | reached (delta 1e-5) | sigma per network | patient-level epsilon | "
          + " | ".join(f"{n} PSNR / SSIM" for n in names) + " | steps | time |")  # fmt: skip
    print("|---" * (6 + len(names)) + "|")
    cells0 = " | ".join(f"{scores0[n][0]:.2f} dB / {scores0[n][1]:.3f}" for n in names)
    print(f"| untrained generator | - | - | - | {cells0} | 0 | - |")
    for tag, spent, scores, seconds, steps in rows:
        reached = f"{spent['epsilon']:.2f}" if spent else "-"
        sigma = f"{spent['noise_multiplier']:.2f}" if spent else "-"
        patient = f"{spent['patient_epsilon']:.3g}" if spent else "-"
        cells = " | ".join(f"{scores[n][0]:.2f} dB / {scores[n][1]:.3f}" for n in names)
        print(f"| {tag} | {reached} | {sigma} | {patient} | {cells} | {steps} | {seconds:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    step = sub.add_parser("step")
    step.add_argument("--steps", type=int, default=12)
    step.add_argument("--repeats", type=int, default=3)
    one = sub.add_parser("_one")
    one.add_argument("--steps", type=int, default=12)
    one.add_argument("--set", dest="overrides", action="append", default=[])
    utility = sub.add_parser("utility")
    utility.add_argument("--site", type=Path, required=True)
    utility.add_argument("--eval", type=Path, action="append", required=True)
    utility.add_argument("--epsilon", type=float, nargs="+", default=[16.0, 8.0, 4.0])
    utility.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.mode == "_one":
        print(json.dumps(one_variant(args.overrides, args.steps)))
    elif args.mode == "step":
        bench_step(args.steps, args.repeats)
    else:
        bench_utility(args.site, args.eval, args.epsilon, args.overrides)


if __name__ == "__main__":
    main()
