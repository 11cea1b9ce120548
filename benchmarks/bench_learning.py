"""Quality after a short local run: trained generator vs untrained vs histogram matching.

Run from the project root, for example (the figures in BENCHMARKS.md):

    .venv/bin/fedsynth phantom runs/phantom --sites 4 --subjects 12,6,3,1 --voxel-mm 2
    .venv/bin/python -m benchmarks.bench_learning --tag E --site runs/phantom/site-1 \\
        --eval runs/phantom/site-1 --eval runs/phantom/site-3 \\
        --set training.lr=5e-4 --set training.lambda_identity=0 \\
        --set training.epochs=10 --set training.decay_epochs=5

Trains with ``train-local`` on ``--site`` (cpu-small plus the ``--set`` overrides), then prints
the mean masked PSNR on each ``--eval`` site's true pairs for the trained G_AB, the untrained
generator, and histogram matching to the training target-domain distribution.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedsynth.client.local import train_local
from fedsynth.common.baselines import HistogramMatcher
from fedsynth.common.config import load_config
from fedsynth.common.data.site import load_site
from fedsynth.common.evaluation import evaluate_pairs, site_pairs
from fedsynth.common.models import define_generator, init_weights
from fedsynth.common.synthesis import Synthesizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="Run name suffix (runs/learn-<tag>).")
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--eval", type=Path, action="append", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(
        preset="cpu-small", overrides=[f"name=learn-{args.tag}", *args.overrides], environ={}
    )
    start = time.perf_counter()
    run = train_local([args.site], config, evaluate=False)
    steps = int(run.history[-1]["step"]) if run.history else 0
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s")

    trained = Synthesizer(run.checkpoint, device="cpu").translate_slices
    site = load_site(args.site, config.data)
    matcher = HistogramMatcher(
        np.concatenate([v.stack.slices[v.stack.masks] for v in site.domain_b])
    )
    untrained_g = init_weights(
        define_generator(config.model, config.data.image_size), seed=0
    ).eval()

    def histogram(slices: np.ndarray) -> np.ndarray:
        return np.stack([matcher(s, s > -1.0 + 1e-6) for s in slices])

    def untrained(slices: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return untrained_g(torch.from_numpy(slices)[:, None])[:, 0].numpy()

    print("| eval site | trained | untrained | histogram matching |\n|---|---|---|---|")
    for eval_site in args.eval:
        name, pairs = site_pairs(eval_site, config.data)
        psnr = [
            evaluate_pairs(name, config.data.direction, pairs, fn).mean["psnr_masked"]
            for fn in (trained, untrained, histogram)
        ]
        print(f"| {eval_site} | " + " | ".join(f"{p:.2f} dB" for p in psnr) + " |")


if __name__ == "__main__":
    main()
