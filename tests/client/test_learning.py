"""A short local training run learns: it beats the untrained generator and histogram matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.client.local import train_local
from fedsynth.common.baselines import HistogramMatcher
from fedsynth.common.config import load_config
from fedsynth.common.data.site import load_site
from fedsynth.common.evaluation import evaluate_pairs, site_pairs
from fedsynth.common.models import define_generator, init_weights
from fedsynth.common.phantom import generate_consortium
from fedsynth.common.synthesis import Synthesizer


@pytest.mark.slow
def test_short_cpu_small_run_beats_untrained_and_histogram_matching(tmp_path: Path) -> None:
    sites = generate_consortium(
        tmp_path / "phantom",
        sites=2,
        subjects=[4, 1],
        seed=0,
        voxel_size=3.0,
        modalities=["T1w", "T2w"],
    )
    config = load_config(
        preset="cpu-small",
        overrides=[
            f"output_dir={tmp_path}",
            "name=learn",
            "data.spacing_mm=[4, 4, 4]",
            "data.image_size=48",
            "training.epochs=36",
            "training.decay_epochs=12",
        ],
        environ={},
    )
    run = train_local([sites[0]], config, evaluate=False)

    trained = Synthesizer(run.checkpoint, device="cpu").translate_slices
    train_site = load_site(sites[0], config.data)
    reference = np.concatenate([v.stack.slices[v.stack.masks] for v in train_site.domain_b])
    matcher = HistogramMatcher(reference)

    def histogram_matching(slices: np.ndarray) -> np.ndarray:
        return np.stack([matcher(s, s > -1.0 + 1e-6) for s in slices])

    untrained_g = init_weights(
        define_generator(config.model, config.data.image_size), seed=0
    ).eval()

    def untrained(slices: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return untrained_g(torch.from_numpy(slices)[:, None])[:, 0].numpy()

    for site in sites:  # the training site's pairs, and an unseen site with another scanner
        name, pairs = site_pairs(site, config.data)
        psnr = {
            label: evaluate_pairs(name, config.data.direction, pairs, fn).mean["psnr_masked"]
            for label, fn in (
                ("trained", trained),
                ("histogram", histogram_matching),
                ("untrained", untrained),
            )
        }
        assert psnr["trained"] > psnr["untrained"], (name, psnr)
        assert psnr["trained"] > psnr["histogram"], (name, psnr)
