"""The phantom warm start: trained by the coordinator with no site present, cached, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import fedsynth.common.training.data
from fedsynth.common.checkpoint import read_metadata
from fedsynth.common.messages import ARRAYS, from_record
from fedsynth.server import warm_start
from fedsynth.server.coordinator import WARM_STARTS, Coordinator
from fedsynth.simulations.engines.inprocess import InProcessGrid, tiny_config

STEPS = 5
WARM = (
    "federation.warm_start=phantom",
    f"federation.warm_start_steps={STEPS}",
    "federation.warm_start_subjects=2",
    "federation.rounds=1",
    "federation.evaluate_sites=false",
    "federation.local_steps=1",
)


def test_the_coordinator_warm_starts_on_the_phantom_with_no_site_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No site folder exists and no node is connected: every folder the warm start reads is
    the phantom it generated inside its own cache, and round 1 would start from its result."""
    read: list[Path] = []
    load_sites = fedsynth.common.training.data.load_sites

    def recording(site_dirs, config, cache_dir):  # type: ignore[no-untyped-def]
        read.extend(Path(d) for d in site_dirs)
        return load_sites(site_dirs, config, cache_dir)

    monkeypatch.setattr(fedsynth.common.training.data, "load_sites", recording)
    config = tiny_config(*WARM)
    coordinator = Coordinator(InProcessGrid({}), config, tmp_path / "runs" / "a")
    cache = tmp_path / "runs" / WARM_STARTS
    assert read and all(cache in path.parents for path in read), read
    assert all((path / "dataset_description.json").exists() is False for path in read)  # gone

    run = json.loads((tmp_path / "runs" / "a" / "run.json").read_text())
    assert run["warm_start"]["source"] == "phantom" and run["warm_start"]["site_data"] == "none"
    assert run["warm_start"]["steps"] == STEPS
    checkpoint = Path(run["initial_generators"]["path"])
    assert checkpoint.parent.parent == cache and run["initial_generators"]["kind"] == "warm-start"
    meta = read_metadata(checkpoint)
    assert meta.kind == "warm-start" and meta.sites == [] and meta.step == STEPS
    weights = load_file(str(checkpoint / "generators.safetensors"))
    for key, value in weights.items():
        np.testing.assert_array_equal(coordinator.state[key].numpy(), value)
    untrained = Coordinator(InProcessGrid({}), tiny_config(), tmp_path / "runs" / "plain").state
    assert any(not np.array_equal(untrained[k].numpy(), weights[k]) for k in weights)
    # The phantom is drawn with its own seed, never a simulated consortium's.
    assert (
        run["warm_start"]["phantom_seed"] == config.training.seed + warm_start.PHANTOM_SEED_OFFSET
    )

    # A second run with the same settings reuses it without training; other settings do not.
    read.clear()
    again = Coordinator(InProcessGrid({}), config, tmp_path / "runs" / "b")
    assert not read
    assert (
        json.loads((tmp_path / "runs" / "b" / "run.json").read_text())["warm_start"]
        == (run["warm_start"])
    )
    for key in weights:
        np.testing.assert_array_equal(again.state[key].numpy(), weights[key])
    assert warm_start.warm_start_key(tiny_config(*WARM, "training.lr=1e-3")) != (
        warm_start.warm_start_key(config)
    )
    # The sites' DP settings do not change what the public start is.
    private = tiny_config(*WARM, "privacy.enabled=true", "privacy.target_epsilon=8")
    tuned = tiny_config(
        *WARM, "privacy.enabled=true", "privacy.target_epsilon=4", "privacy.lr=1e-4"
    )
    assert warm_start.warm_start_key(private) == warm_start.warm_start_key(tuned)
    assert warm_start.warm_start_key(private) == warm_start.warm_start_key(config)
    assert not list(cache.glob(".phantom-*"))  # no half-written folder left behind


def test_sites_receive_the_warm_start_in_round_one(sites: list[Path], tmp_path: Path) -> None:
    nodes = {
        i: {"data-dir": str(site), "state-dir": str(tmp_path / f"state-{i}")}
        for i, site in enumerate(sites, start=1)
    }
    config = tiny_config(*WARM, "federation.min_sites=3")
    grid = InProcessGrid(nodes, names={i: s.name for i, s in enumerate(sites, start=1)})
    Coordinator(grid, config, tmp_path / "run").run()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    weights = load_file(str(Path(run["initial_generators"]["path"]) / "generators.safetensors"))
    sent = from_record(grid.sent[0].content.array_records[ARRAYS], "float32")
    assert set(sent) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(sent[key].numpy(), value)


def test_warm_start_and_initial_generators_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        tiny_config("federation.warm_start=phantom", f"federation.initial_generators={tmp_path}")
