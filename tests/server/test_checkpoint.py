"""Per-round checkpoints: content, the latest marker, and resuming only from complete rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointMetadata
from common.config import DataConfig, ModelConfig
from common.models import define_generator, init_weights
from server.checkpoint import (
    ROUND_RECORD,
    RoundRecord,
    latest_round,
    load_round,
    round_dir,
    save_round,
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
