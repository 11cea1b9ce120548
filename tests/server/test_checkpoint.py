"""Per-round checkpoints: content, the latest marker, and resuming only from complete rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsynth.common.checkpoint import CheckpointMetadata, load_checkpoint
from fedsynth.common.config import DataConfig, ModelConfig
from fedsynth.common.models import define_generator, init_weights
from fedsynth.server.round_store import (
    BEST_NAME,
    ROUND_RECORD,
    BestRound,
    RoundRecord,
    best_checkpoint,
    best_round,
    choose_best,
    latest_round,
    load_round,
    round_dir,
    save_round,
    write_best,
)

TINY = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
META = CheckpointMetadata(kind="untrained", direction="T1w->T2w", model=TINY, data=DataConfig())


def _generators(seed: int) -> dict[str, torch.nn.Module]:
    return {
        name: init_weights(define_generator(TINY, 32), seed=seed + i)
        for i, name in enumerate(("g_ab", "g_ba"))
    }


def test_rounds_are_saved_and_the_latest_is_resumed(tmp_path: Path) -> None:
    assert latest_round(tmp_path) is None
    for number in (1, 2):
        record = RoundRecord(
            round=number,
            aggregated={"loss_g": 1.0 / number},
            per_site={"site-1": {"loss_g": 0.5}},
            bytes_per_site={"site-1": 1234},
            epsilon_per_site={"site-1": 0.5 * number, "site-2": 0.7 * number},
            delta=1e-5,
            rejected={"site-3": ["conv.weight: 1 NaN or infinite value(s)"]},
        )
        save_round(tmp_path, _generators(number), META, record)
    assert latest_round(tmp_path) == 2
    metadata, networks, record = load_round(tmp_path)
    assert metadata.kind == "federated" and metadata.round == 2
    assert metadata.privacy == {
        "epsilon_per_site": {"site-1": 1.0, "site-2": 1.4},
        "worst_epsilon": 1.4,
        "delta": 1e-5,
    }
    assert record.rejected == {"site-3": ["conv.weight: 1 NaN or infinite value(s)"]}
    expected = _generators(2)["g_ab"].state_dict()
    for key, value in expected.items():
        assert torch.equal(networks["g_ab"][key], value), key
    _, first, _ = load_round(tmp_path, 1)
    assert not torch.equal(first["g_ab"]["model.1.weight"], networks["g_ab"]["model.1.weight"])


def test_an_incomplete_round_is_never_resumed(tmp_path: Path) -> None:
    save_round(tmp_path, _generators(0), META, RoundRecord(round=1))
    # A crash while round 2 was being written: weights there, but no record and no marker.
    folder = round_dir(tmp_path, 2)
    folder.mkdir(parents=True)
    (folder / "generators.safetensors").write_bytes(b"partial")
    assert latest_round(tmp_path) == 1
    # A marker that points at an incomplete folder is an error, not a silent restart.
    (tmp_path / "latest").write_text("2\n")
    with pytest.raises(ValueError, match="incomplete"):
        latest_round(tmp_path)


def test_round_record_is_plain_json(tmp_path: Path) -> None:
    folder = save_round(tmp_path, _generators(0), META, RoundRecord(round=3, seconds=12.5))
    raw = json.loads((folder / ROUND_RECORD).read_text())
    assert raw["round"] == 3 and raw["seconds"] == 12.5 and raw["epsilon_per_site"] == {}
    with pytest.raises(FileNotFoundError, match="no completed round"):
        load_round(tmp_path / "empty")


def test_best_round_prefers_the_sites_validation_and_keeps_the_earlier_of_ties(
    tmp_path: Path,
) -> None:
    def record(number: int, **aggregated: float) -> RoundRecord:
        sites = {"a": {"psnr_masked": aggregated.get("eval/psnr_masked", 0.0), "num-examples": 3}}
        return RoundRecord(round=number, aggregated=aggregated, evaluation_per_site=sites)

    central_only = [record(1, **{"central/psnr_masked": 30.0})]
    first = choose_best(central_only)
    assert first is not None and first.metric == "central/psnr_masked"
    records = [
        *central_only,
        record(2, **{"eval/psnr_masked": 20.0, "central/psnr_masked": 40.0}),
        record(3, **{"eval/psnr_masked": 22.0}),
        record(4, **{"eval/psnr_masked": float("nan")}),
        record(5, **{"eval/psnr_masked": 22.0}),
        record(6, **{"central/psnr_masked": 50.0}),  # no site scored it: cannot outrank
        record(7),
    ]
    best = choose_best(records)
    assert best is not None
    assert (best.round, best.score, best.metric, best.last_round) == (
        3,
        22.0,
        "eval/psnr_masked",
        7,
    )
    assert best.per_site == {"a": 22.0} and best.examples == {"a": 3.0}
    assert best.line == "best round 3 (22.00 dB on the sites' validation data)"
    assert choose_best([record(1)]) is None


def test_best_json_and_the_moving_average_checkpoint(tmp_path: Path) -> None:
    assert best_round(tmp_path) is None and best_checkpoint(tmp_path) is None
    for number, score in ((1, 18.0), (2, 21.0), (3, 19.5)):
        record = RoundRecord(round=number, aggregated={"eval/psnr_masked": score})
        save_round(tmp_path, _generators(number), META, record, ema=_generators(10 + number),
                   ema_decay=0.9)  # fmt: skip
    # No best.json was written (only the coordinator writes it): chosen from the records.
    assert not (tmp_path / BEST_NAME).exists()
    assert best_round(tmp_path) == 2
    assert best_checkpoint(tmp_path) == round_dir(tmp_path, 2)
    ema = best_checkpoint(tmp_path, ema=True)
    assert ema == round_dir(tmp_path, 2) / "ema"
    metadata, networks = load_checkpoint(ema)
    assert metadata.round == 2 and metadata.metrics == {"ema_decay": 0.9}
    expected = _generators(12)["g_ab"].state_dict()
    assert all(torch.equal(networks["g_ab"][k], v) for k, v in expected.items())
    # A stale best.json (older than the latest round) is not trusted.
    write_best(tmp_path, BestRound(1, 18.0, "eval/psnr_masked", "x", last_round=1))
    assert best_round(tmp_path) == 2
    write_best(tmp_path, BestRound(1, 18.0, "eval/psnr_masked", "x", last_round=3))
    assert best_round(tmp_path) == 1  # a current one is
    # Records written before the validation field existed still load.
    raw = json.loads((round_dir(tmp_path, 1) / ROUND_RECORD).read_text())
    raw.pop("evaluation_per_site")
    (round_dir(tmp_path, 1) / ROUND_RECORD).write_text(json.dumps(raw))
    assert load_round(tmp_path, 1)[2].evaluation_per_site == {}
    save_round(tmp_path, _generators(0), META, RoundRecord(round=4))
    with pytest.raises(FileNotFoundError, match="ema_decay"):
        write_best(tmp_path, BestRound(4, 30.0, "eval/psnr_masked", "x", last_round=4))
        best_checkpoint(tmp_path, ema=True)
