"""What a trainer reads: the sites as loaded, a shuffled loader, the output intensity scale.

Shared by a hospital's ``train-local`` and rounds, the coordinator's phantom warm start and the
simulated experiment's pooled model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedsynth.common.checkpoint import OutputScale
from fedsynth.common.config import RunConfig
from fedsynth.common.data.datasets import TrainingSlices
from fedsynth.common.data.site import SiteData, Volume, load_site


def output_scale(volumes: Sequence[Volume]) -> OutputScale:
    """Typical target-domain intensity range: the mean of the volumes' mappings."""
    kinds = {v.stack.mapping.kind for v in volumes}
    kind = "window" if kinds == {"window"} else "percentile"
    low = float(np.mean([v.stack.mapping.low for v in volumes]))
    high = float(np.mean([v.stack.mapping.high for v in volumes]))
    return OutputScale(low=low, high=high, kind=kind)


def make_loader(dataset: TrainingSlices, config: RunConfig, epoch: int) -> DataLoader:
    """A loader whose shuffle depends only on (seed, epoch): resumed runs see the same order."""
    generator = torch.Generator().manual_seed(config.training.seed * 100_003 + epoch)
    batch = config.training.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=generator,
        num_workers=config.training.num_workers,
        drop_last=len(dataset) > batch,
    )


def load_sites(site_dirs: Sequence[Path], config: RunConfig, cache_dir: Path) -> list[SiteData]:
    """The sites as loaded, nothing held out (see :func:`training_sites`)."""
    return [
        load_site(Path(d), config.data, cache_dir=cache_dir, seed=config.training.seed)
        for d in site_dirs
    ]
