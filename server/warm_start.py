"""A public warm start: the run's generators trained on the built-in phantom before round 1.

Under DP-SGD a model that starts from random weights spends its privacy budget learning what any
head looks like. The phantom (:mod:`fedsynth.common.phantom`) holds no patient, and its contrasts
are exact ground-truth pairs, so the coordinator can teach the generators the anatomy-to-contrast
mapping before any site is asked for anything: it costs no privacy, and the sites then fine-tune a
model that already works (``federation.warm_start = "phantom"``).

The phantom consortium is drawn with its own seed (:data:`PHANTOM_SEED_OFFSET` past the run's
training seed), not the seeds a simulated consortium is drawn with by default
(``simulation.seed = 0``): the warm start then shares no subject and no scanner with it. It
trains the run's model without DP on exact pairs (pix2pix, both generators, whatever the run's
privacy), on every slice of ``warm_start_subjects`` subjects at the run's preprocessing, for
``warm_start_steps`` steps, and keeps the result in ``<cache>/phantom-<key>/``, where the key
hashes everything that decides the weights (model, preprocessing, training settings, steps,
subjects, fedsynth's version); a second run with the same settings loads it. It is written to a
temporary folder and renamed, so a crash leaves no half-trained cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsynth.common import __version__
from fedsynth.common.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from fedsynth.common.config import RunConfig
from fedsynth.common.modalities import Direction

logger = logging.getLogger(__name__)

PHANTOM_SEED_OFFSET = 1_000_003
PHANTOM_VOXEL_MM = 2.0
CHECKPOINT = "checkpoint"
RECORD = "warm-start.json"


def warm_start_key(config: RunConfig) -> str:
    """A hash of everything the warm start's weights depend on."""
    fed = config.federation
    training = config.training.model_dump(mode="json", exclude={"epochs", "decay_epochs"})
    recipe = {
        "fedsynth": __version__,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", exclude={"cache_dir"}),
        "training": training,
        "steps": fed.warm_start_steps,
        "subjects": fed.warm_start_subjects,
    }
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def phantom_warm_start(config: RunConfig, cache: Path) -> Path:
    """The warm start's checkpoint folder for ``config``: from ``cache``, or trained now.

    Reads no site's data: the only images are phantom subjects it generates itself.
    """
    folder = Path(cache) / f"phantom-{warm_start_key(config)}"
    if (folder / RECORD).exists():
        logger.info("warm start: reusing %s", folder)
        return folder / CHECKPOINT
    Path(cache).mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".phantom-", dir=cache))
    try:
        record = _train(config, partial)
        (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        try:
            partial.replace(folder)
        except OSError:  # another coordinator finished the same warm start first
            if not (folder / RECORD).exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder / CHECKPOINT


def describe(checkpoint: Path) -> dict[str, Any]:
    """What the warm start was, for the run folder (the cached record)."""
    return dict(json.loads((Path(checkpoint).parent / RECORD).read_text(encoding="utf-8")))


def _train(config: RunConfig, out: Path) -> dict[str, Any]:
    from fedsynth.common.data.datasets import training_set
    from fedsynth.common.phantom import generate_consortium
    from fedsynth.common.training.data import load_sites, make_loader, output_scale
    from fedsynth.common.training.trainer import CycleGANTrainer

    direction = Direction.parse(config.data.direction)  # the phantom makes every contrast
    fed = config.federation
    seed = config.training.seed + PHANTOM_SEED_OFFSET
    start = time.perf_counter()
    site_dir = generate_consortium(
        out / "phantom",
        sites=1,
        subjects=[fed.warm_start_subjects],
        seed=seed,
        modalities=[direction.source, direction.target],
        voxel_size=PHANTOM_VOXEL_MM,
    )[0]
    # Exact pairs: no misalignment, no registration, nothing held out, no DP.
    public = config.model_copy(deep=True)
    public.data.misalignment = "none"
    public.data.validation_fraction = 0.0
    public.privacy.enabled = False
    sites = load_sites([site_dir], public, out / "cache")
    dataset = training_set(sites, seed=seed)
    trainer = CycleGANTrainer(public.model, public.training, public.data.image_size)
    logger.info(
        "warm start: training %s on %d phantom slices (%d subjects, seed %d) for %d steps",
        config.data.direction,
        len(dataset),
        fed.warm_start_subjects,
        seed,
        fed.warm_start_steps,
    )
    steps = epoch = 0
    losses: dict[str, float] = {}
    while steps < fed.warm_start_steps:
        trainer.epoch = epoch
        summary = trainer.train_epoch(
            make_loader(dataset, public, epoch), max_steps=fed.warm_start_steps - steps
        )
        steps += int(summary["steps"])
        losses = {k: v for k, v in summary.items() if k.startswith("loss_")}
        epoch += 1
    metadata = CheckpointMetadata(
        kind="warm-start",
        direction=config.data.direction,
        model=config.model,
        data=public.data,
        output_scale=output_scale([v for s in sites for v in s.domain_b]),
        epoch=epoch,
        step=trainer.step,
        sites=[],
        metrics=losses,
    )
    save_checkpoint(out / CHECKPOINT, trainer.generators(), metadata)
    shutil.rmtree(out / "phantom", ignore_errors=True)
    shutil.rmtree(out / "cache", ignore_errors=True)
    load_checkpoint(out / CHECKPOINT)  # it reads back
    seconds = time.perf_counter() - start
    logger.info("warm start: %d steps in %.0f s", steps, seconds)
    return {
        "source": "phantom",
        "phantom_seed": seed,
        "subjects": fed.warm_start_subjects,
        "slices": len(dataset),
        "steps": steps,
        "seconds": round(seconds, 1),
        "key": warm_start_key(config),
        "site_data": "none",
    }
