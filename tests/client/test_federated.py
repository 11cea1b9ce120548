"""The site's side of a round: FedProx term, per-round state, node settings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.client.app import setup_site_logging
from fedsynth.client.site_round import evaluate_round, train_round
from fedsynth.client.site_settings import SiteError, SiteSettings
from fedsynth.client.state_store import DiskStore, MemoryStore
from fedsynth.common.config import RunConfig, dumps_config
from fedsynth.common.data.datasets import PairedSlices, training_set
from fedsynth.common.data.site import load_site
from fedsynth.common.data.validation import hold_out, validation_pairs, validation_slices
from fedsynth.common.evaluation import evaluate_pairs
from fedsynth.common.messages import SHARED_NETS, RoundInstruction, config_digest, flatten
from fedsynth.common.models import define_cyclegan
from fedsynth.common.training.trainer import CycleGANTrainer
from fedsynth.simulations.engines.inprocess import phantom_sites, tiny_config
from tests.common.test_trainer import SIZE, TINY, _batches, _training


def _generator_shift(trainer: CycleGANTrainer, start: dict[str, torch.Tensor]) -> float:
    now = {
        f"{n}.{k}": v
        for n, net in trainer.generators().items()
        for k, v in net.state_dict().items()
    }
    return float(sum(((now[k] - start[k]) ** 2).sum() for k in start) ** 0.5)


def test_proximal_term_is_the_squared_distance_and_holds_weights_back() -> None:
    shifts = {}
    for mu in (0.0, 50.0):
        trainer = CycleGANTrainer(TINY, _training(lr=1e-2), SIZE)
        start = {
            f"{n}.{k}": v.clone()
            for n, net in trainer.generators().items()
            for k, v in net.state_dict().items()
        }
        trainer.set_proximal(mu)
        with torch.no_grad():
            assert float(trainer._proximal_term()) == 0.0
        metrics = {}
        for batch in _batches(6):
            metrics = trainer.train_step(batch)
        if mu > 0:
            # Independent computation of ||w - w0||^2 over the generators' parameters.
            expected = sum(
                float(((p.detach() - start[f"{n}.{k}"]) ** 2).sum())
                for n, net in trainer.generators().items()
                for k, p in net.named_parameters()
            )
            with torch.no_grad():
                assert float(trainer._proximal_term()) == pytest.approx(expected, rel=1e-5)
            assert metrics["loss_proximal"] > 0
        else:
            assert "loss_proximal" not in metrics
        shifts[mu] = _generator_shift(trainer, start)
    assert shifts[50.0] < shifts[0.0]


def test_set_lr_reaches_every_optimiser() -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE)
    trainer.set_lr(1.25e-4)
    assert {g["lr"] for o in trainer.optimizers.values() for g in o.param_groups} == {1.25e-4}


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_state_store_returns_the_state_a_round_started_from(kind: str, tmp_path: Path) -> None:
    store = DiskStore(tmp_path) if kind == "disk" else MemoryStore()
    assert store.load("run", 1) is None
    for number in range(1, 6):
        store.save("run", number, f"state after {number}".encode())
    assert store.load("run", 6) == b"state after 5"
    assert store.load("run", 5) == b"state after 4"  # a resumed round 5 starts from round 4
    assert store.load("run", 3) is None  # only the last three are kept
    assert store.load("other-run", 6) is None
    if kind == "disk":
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
            "state-round-0003.pt",
            "state-round-0004.pt",
            "state-round-0005.pt",
        ]


def test_site_settings_from_node_or_simulation_config(tmp_path: Path) -> None:
    deployed = SiteSettings.from_configs(
        {"data-dir": str(tmp_path / "bids"), "state-dir": str(tmp_path / "s"), "device": "cuda:0"},
        {},
    )
    assert deployed.data_dir == tmp_path / "bids" and deployed.device == "cuda:0"
    assert deployed.cache_dir == tmp_path / "s" / "cache"
    simulated = SiteSettings.from_configs(
        {"partition-id": 1, "num-partitions": 2},
        {"site-dirs": "/a/site-1,/a/site-2", "state-root": str(tmp_path), "cache-dir": "/c"},
    )
    assert simulated.data_dir == Path("/a/site-2") and simulated.partition_id == 1
    assert simulated.state_dir == tmp_path / "site-1" and simulated.cache_dir == Path("/c")
    with pytest.raises(SiteError, match="no data-dir"):
        SiteSettings.from_configs({}, {})
    with pytest.raises(SiteError, match="partition 5"):
        SiteSettings.from_configs({"partition-id": 5}, {"site-dirs": "/a,/b"})
    with pytest.raises(SiteError, match="fault"):
        SiteSettings.from_configs({"data-dir": "/x", "fault": "explode"}, {})


def test_site_logging_reaches_stderr_and_the_state_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ("fedsynth.client", "fedsynth.common")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    try:
        # A fresh ClientApp process: no site handler yet (an earlier test's in-process sites may
        # have left one on a stderr that pytest has captured and replaced since).
        for name in names:
            target = logging.getLogger(name)
            target.handlers[:] = [h for h in target.handlers if not getattr(h, "fedsynth_site", 0)]
        setup_site_logging(tmp_path / "a")
        setup_site_logging(tmp_path / "a")  # every round calls it: no second handler
        logging.getLogger("fedsynth.client.site_round").info("round 3: step 10/40")
        assert (tmp_path / "a" / "site.log").read_text().count("round 3: step 10/40") == 1
        assert capsys.readouterr().err.count("fedsynth: round 3: step 10/40") == 1
        setup_site_logging(tmp_path / "b")  # another simulated site in the same process
        logging.getLogger("fedsynth.common.data").warning("skipped a scan")
        assert "skipped a scan" in (tmp_path / "b" / "site.log").read_text()
        assert "skipped a scan" not in (tmp_path / "a" / "site.log").read_text()
    finally:
        for name, (level, handlers) in saved.items():
            target = logging.getLogger(name)
            for handler in target.handlers:
                if handler not in handlers:
                    handler.close()
            target.handlers[:] = handlers
            target.setLevel(level)


def test_a_round_reports_its_progress_while_it_trains() -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE)
    calls: list[tuple[int, int | None, float]] = []
    trainer.train_epoch(
        _batches(3),
        max_steps=2,
        report=lambda steps, total, rate, losses: calls.append((steps, total, losses["loss_g"])),
        report_every_s=0.0,
    )
    assert [(s, t) for s, t, _ in calls] == [(1, 2), (2, 2)]
    assert all(loss > 0 for _, _, loss in calls)


# ----------------------------------------------------------------- the site's validation part


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom hospital of two subjects (slice-level validation blocks)."""
    return phantom_sites(tmp_path_factory.mktemp("hospital"), subjects=(2,))[0]


def _instruction(config: RunConfig) -> RoundInstruction:
    text = dumps_config(config)  # one local epoch, generators shared, float32 (the defaults)
    return RoundInstruction(
        round=1,
        lr=config.training.lr,
        run_key="validation-test",
        config_digest=config_digest(text),
        run_config=text,
    )


def _global_state(config: RunConfig) -> dict[str, torch.Tensor]:
    nets = define_cyclegan(config.model, config.data.image_size, seed=config.training.seed)
    return flatten(nets, SHARED_NETS["generators"])


def test_a_site_evaluates_on_its_validation_part_and_trains_on_the_rest(
    phantom_site: Path, tmp_path: Path
) -> None:
    config = tiny_config()
    settings = SiteSettings(data_dir=phantom_site, cache_dir=tmp_path / "cache")
    state = _global_state(config)
    metrics = evaluate_round(settings, _instruction(config), state)

    # Independent: split the site here, score the same generator on the held-out sessions.
    site = load_site(phantom_site, config.data, cache_dir=tmp_path / "cache")
    held = hold_out(site, config.data.validation_fraction, config.training.seed)
    everything = sum(len(PairedSlices([pair])) for pair in site.paired)
    assert 0 < metrics["num-examples"] == validation_slices(held) < everything
    generator = define_cyclegan(config.model, config.data.image_size, seed=config.training.seed)
    net = generator["g_ab"].eval()

    def translate(slices: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(slices)[:, None])[:, 0].numpy()

    report = evaluate_pairs(site.name, config.data.direction, validation_pairs(held), translate)
    assert metrics["psnr_masked"] == pytest.approx(report.mean["psnr_masked"], rel=1e-4)
    assert metrics["num-subjects"] == len(validation_pairs(held))

    # Training sees the rest: one epoch's samples are the training part's full batches.
    _, trained = train_round(settings, _instruction(config), state, MemoryStore())
    batch = config.training.batch_size
    examples = len(training_set([held]))
    assert examples < len(training_set([site]))
    assert trained["num-examples"] == (examples // batch) * batch


def test_a_site_with_nothing_held_out_declines_to_evaluate(
    phantom_site: Path, tmp_path: Path
) -> None:
    config = tiny_config("data.validation_fraction=0")
    settings = SiteSettings(data_dir=phantom_site, cache_dir=tmp_path / "cache")
    with pytest.raises(SiteError, match="nothing to evaluate"):
        evaluate_round(settings, _instruction(config), _global_state(config))
