"""Local and pooled training keep the epoch that scores best on the sites' validation data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.client.local import (
    BEST_CHECKPOINT_DIR,
    BEST_NAME,
    VALIDATION_METRIC,
    best_epoch,
    train_local,
)
from fedsynth.common.checkpoint import load_checkpoint
from fedsynth.common.data.site import load_site
from fedsynth.common.data.validation import hold_out, validation_pairs
from fedsynth.common.evaluation import evaluate_pairs
from fedsynth.common.models import define_generator
from fedsynth.simulations.engines.inprocess import phantom_sites, tiny_config


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_sites(tmp_path_factory.mktemp("local"), subjects=(2, 1))


def _lines(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


SETTINGS = ("training.decay_epochs=0", "training.lr=0.002")


def test_the_best_epoch_is_kept_and_scored_on_the_validation_part_only(
    two_sites: list[Path], tmp_path: Path
) -> None:
    settings = (*SETTINGS, f"output_dir={tmp_path}", "name=pooled",
                f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    run = train_local(two_sites, tiny_config(*settings, "training.epochs=3"), evaluate=False)
    folder = tmp_path / "pooled"
    scores = [line[VALIDATION_METRIC] for line in _lines(folder)]
    assert len(scores) == 3
    expected = int(np.argmax(scores)) + 1  # the first epoch with the highest score
    best = json.loads((folder / BEST_NAME).read_text())
    assert best["epoch"] == expected == best_epoch(folder) == run.best_epoch
    assert best["last_epoch"] == 3 and set(best["per_site"]) == {"site-1", "site-2"}
    assert best["score"] == pytest.approx(scores[expected - 1])
    assert run.best_checkpoint == folder / BEST_CHECKPOINT_DIR

    # Independent: the kept generator, scored here on the held-out part of each site.
    config = tiny_config(*settings)
    metadata, networks = load_checkpoint(folder / BEST_CHECKPOINT_DIR)
    assert metadata.epoch == expected
    net = define_generator(config.model, config.data.image_size)
    net.load_state_dict(networks["g_ab"])
    net.eval()

    def translate(slices: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(slices)[:, None])[:, 0].numpy()

    weighted = total = 0.0
    for site_dir in two_sites:
        site = load_site(site_dir, config.data, cache_dir=tmp_path / "cache")
        pairs = validation_pairs(hold_out(site, 0.15, config.training.seed))
        report = evaluate_pairs(site.name, config.data.direction, pairs, translate)
        slices = sum(s.slices for s in report.subjects)
        assert best["examples"][site.name] == slices
        assert best["per_site"][site.name] == pytest.approx(report.mean["psnr_masked"], rel=1e-4)
        weighted += report.mean["psnr_masked"] * slices
        total += slices
    assert best["score"] == pytest.approx(weighted / total, rel=1e-4)


def test_a_resumed_run_keeps_the_best_epoch_so_far(two_sites: list[Path], tmp_path: Path) -> None:
    settings = (*SETTINGS, f"output_dir={tmp_path}", "name=local")
    train_local(two_sites[:1], tiny_config(*settings, "training.epochs=1"), evaluate=False)
    folder = tmp_path / "local"
    # Pretend epoch 1 scored better than anything later can.
    meta_path = folder / BEST_CHECKPOINT_DIR / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"][VALIDATION_METRIC] = 99.0
    meta_path.write_text(json.dumps(meta))
    _, before = load_checkpoint(folder / BEST_CHECKPOINT_DIR)

    run = train_local(
        two_sites[:1], tiny_config(*settings, "training.epochs=3"), resume=True, evaluate=False
    )
    assert len(_lines(folder)) == 3 and run.best_epoch == 1 == best_epoch(folder)
    best = json.loads((folder / BEST_NAME).read_text())
    assert (best["epoch"], best["score"], best["last_epoch"]) == (1, 99.0, 3)
    _, after = load_checkpoint(folder / BEST_CHECKPOINT_DIR)
    assert all(torch.equal(after["g_ab"][k], v) for k, v in before["g_ab"].items())
    _, last = load_checkpoint(folder / "checkpoint")
    assert any(not torch.equal(last["g_ab"][k], v) for k, v in before["g_ab"].items())


def test_a_skipped_file_is_named_once_though_the_site_is_trained_and_evaluated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """train-local reads its sites once: the evaluation uses the sites as loaded for training,
    so a damaged scan skipped with data.skip_bad is logged once, not once per pass."""
    from tests.intake import write_bad_site

    bad = write_bad_site(tmp_path / "site", kinds=["truncated"], good_shape=(40, 48, 40))
    config = tiny_config(
        *SETTINGS, "training.epochs=1", f"output_dir={tmp_path}", "name=local", "data.skip_bad=true"
    )
    with caplog.at_level("WARNING", logger="fedsynth.common.data.site"):
        run = train_local([tmp_path / "site"], config, evaluate=True)
    assert len(run.evaluations) == 1 and run.evaluations[0].site == "site"
    (path,) = bad
    said = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
    assert len(said) == 1, said
