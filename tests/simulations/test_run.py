"""The experiment runner: same compute for the baselines, grids, folders that are never mixed,
per-site settings reaching the sites, and one whole phantom experiment end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.client.site_settings import SiteSettings
from fedsynth.common.data.datasets import UnpairedSlices
from fedsynth.common.data.site import load_site
from fedsynth.common.metrics import to_unit
from fedsynth.simulations.engines.inprocess import tiny_config
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.evaluation import _mean
from fedsynth.simulations.grid import grid_cells
from fedsynth.simulations.phases import Phases, prepare_folder
from fedsynth.simulations.split import make_split
from fedsynth.simulations.training import baseline_config
from tests.conftest import SiteMaker


def test_baselines_get_the_federations_compute() -> None:
    config = tiny_config(
        "federation.rounds=6", "federation.local_epochs=2", "training.epochs=10",
        "training.decay_epochs=5",
    )  # fmt: skip
    local = baseline_config(config, "local-site-1", Path("/tmp/x"), slices=40)
    assert local.training.epochs == 12  # 6 rounds x 2 local epochs
    assert local.training.decay_epochs == 3 * 2  # decay over round(6 * 5 / 10) = 3 rounds
    assert local.run_dir == Path("/tmp/x/local-site-1")
    stepped = tiny_config(
        "federation.rounds=4", "federation.local_steps=5", "training.batch_size=4"
    )
    # 4 rounds x 5 steps = 20 steps; 40 examples in batches of 4 = 10 steps an epoch -> 2 epochs.
    assert baseline_config(stepped, "p", Path("/tmp"), slices=40).training.epochs == 2
    # Pooled over 3 sites: their 3 x 20 steps on 120 examples (30 steps an epoch) -> 2 epochs.
    assert baseline_config(stepped, "p", Path("/tmp"), slices=120, sites=3).training.epochs == 2
    assert baseline_config(stepped, "p", Path("/tmp"), slices=120).training.epochs == 1


def test_site_level_dp_baselines_train_without_noise() -> None:
    config = tiny_config("privacy.enabled=true", "privacy.level=site", "privacy.noise_multiplier=1")
    assert not baseline_config(config, "pooled", Path("/tmp"), slices=8).privacy.enabled
    example = tiny_config("privacy.enabled=true", "privacy.noise_multiplier=1")
    assert baseline_config(example, "pooled", Path("/tmp"), slices=8).privacy.enabled


def test_grid_cells_are_every_combination() -> None:
    cells = grid_cells(
        {
            "privacy": {"off": [], "eps8": ["privacy.enabled=true", "privacy.target_epsilon=8"]},
            "strategy": {
                "fedavg": ["federation.strategy=fedavg"],
                "fedprox": ["federation.strategy=fedprox"],
            },
        }
    )  # fmt: skip
    assert [label for label, _, _ in cells] == [
        "privacy=off,strategy=fedavg",
        "privacy=off,strategy=fedprox",
        "privacy=eps8,strategy=fedavg",
        "privacy=eps8,strategy=fedprox",
    ]
    assert cells[3][1] == [
        "privacy.enabled=true", "privacy.target_epsilon=8", "federation.strategy=fedprox",
    ]  # fmt: skip
    assert cells[3][2] == {"privacy": "eps8", "strategy": "fedprox"}
    with pytest.raises(ExperimentError, match="grid is empty"):
        grid_cells({})


def test_an_experiment_folder_is_never_mixed_or_wrongly_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    prepare_folder(folder, resume=False, overwrite=False)
    Phases.open(folder).mark("split", 1.5)
    assert Phases.open(folder).done == {"split": 1.5}
    with pytest.raises(ExperimentError, match="--resume"):
        prepare_folder(folder, resume=False, overwrite=False)
    prepare_folder(folder, resume=True, overwrite=False)
    assert Phases.open(folder).finished("split")
    prepare_folder(folder, resume=False, overwrite=True)
    assert not (folder / "phases.json").exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(ExperimentError, match="refusing to delete"):
        prepare_folder(other, resume=False, overwrite=True)
    assert (other / "scan.nii.gz").exists()


def test_mean_over_sites_is_weighted_by_test_slices() -> None:
    per_site = {"a": {"psnr": 20.0, "ssim": math.nan}, "b": {"psnr": 10.0, "ssim": 0.5}}
    mean = _mean(per_site, {"a": 3, "b": 1})
    assert mean["psnr"] == pytest.approx((20 * 3 + 10 * 1) / 4)
    assert mean["ssim"] == pytest.approx(0.5)  # NaN left out


def test_per_site_misalignment_reaches_each_slice(make_site: SiteMaker, tmp_path: Path) -> None:
    from fedsynth.common.config import DataConfig

    data = DataConfig(spacing_mm=(4.0, 4.0, 4.0), image_size=16, min_foreground=0.05)
    site = load_site(make_site("s", shape=(24, 26, 20)), data, cache_dir=tmp_path / "c")
    single = site.domain_b[:1]  # weak pairing: domain_b holds both subjects' T2w
    volumes = [*single, *single]
    mixed = UnpairedSlices(site.domain_a, volumes, misalignment=["none", "severe"], seed=1)
    plain = UnpairedSlices(site.domain_a, volumes, misalignment="none", seed=1)
    first = len(single[0].stack)
    moved = [not torch.equal(mixed[i]["b"], plain[i]["b"]) for i in range(len(mixed))]
    b_index = [int(mixed._b_index[i]) for i in range(len(mixed))]
    for changed, index in zip(moved, b_index, strict=True):
        if index < first:
            assert not changed  # slices of the aligned volume are never moved
    assert any(moved)
    with pytest.raises(ValueError, match="2 misalignment levels for 1 B volumes"):
        UnpairedSlices(site.domain_a, single, misalignment=["none", "slight"])


def test_a_simulated_site_reads_its_own_misalignment_and_threads() -> None:
    run_config = {
        "site-dirs": "/a/site-1,/a/site-2",
        "site-misalignment": "none,severe",
        "cpus-per-site": 1,
    }
    site = SiteSettings.from_configs({"partition-id": 1}, run_config)
    assert site.misalignment == "severe" and site.threads == 1
    assert SiteSettings.from_configs({"partition-id": 0}, run_config).misalignment == "none"


def test_phantom_split_is_reproducible(tmp_path: Path) -> None:
    config = tiny_config(
        "simulation.num_sites=3", "simulation.subjects=[3, 2, 1]", "simulation.phantom_voxel_mm=4",
        "simulation.unpaired_fraction=1.0", "simulation.misalignment=['none', 'slight', 'severe']",
        "simulation.missing_domain=['', '', 'B']",
    )  # fmt: skip
    plan = make_split(config, tmp_path / "e", [], echo=lambda _: None)
    sizes = [len(s.train) for s in plan.sites]
    assert sizes == [3, 2, 1]  # the training counts; the test subjects are extra
    assert [len(s.test) for s in plan.sites] == [1, 1, 1]
    assert [s.misalignment for s in plan.sites] == ["none", "slight", "severe"]
    assert plan.sites[2].excluded is not None and plan.sites[0].excluded is None
    assert plan.sites[0].scanner["field_strength_t"] != plan.sites[1].scanner["field_strength_t"]
    again = make_split(config, tmp_path / "e", [], echo=lambda _: None)  # pool reused
    assert [[t.label for t in s.test] for s in again.sites] == [
        [t.label for t in s.test] for s in plan.sites
    ]
    shared = make_split(
        tiny_config(
            "simulation.num_sites=2",
            "simulation.subjects=[1, 1]",
            "simulation.phantom_voxel_mm=4",
            "simulation.scanners=shared",
        ),
        tmp_path / "f",
        [],
        echo=lambda _: None,
    )
    assert shared.sites[0].scanner == shared.sites[1].scanner


def test_naive_baselines_are_summed_from_the_training_sites_and_scored_on_the_test_sets(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    """Each training site's own statistics, summed; a site without a target domain adds none;
    the baselines are scored on the same test subjects and mask as a model."""
    from fedsynth.common.baselines import (
        BASELINE_NAMES,
        LOOKUP_TABLE,
        IntensityStats,
        LookupTableBaseline,
        site_statistics,
    )
    from fedsynth.common.data.datasets import PairedSlices
    from fedsynth.simulations.evaluation import TestSets, naive_baselines

    config = tiny_config("data.spacing_mm=[4, 4, 4]", "data.image_size=16")
    shape = (24, 26, 20)
    site_1 = make_site("site-1", {"sub-01": ["T1w", "T2w"], "sub-02": ["T2w"]}, shape)
    site_2 = make_site("site-2", {"sub-03": ["T1w", "T2w"], "sub-04": ["T1w", "T2w"]}, shape)
    site_3 = make_site("site-3", {"sub-05": ["T1w"]}, shape)  # no T2w: nothing to add
    test = make_site("test-1", {"sub-09": ["T1w", "T2w"]}, shape)
    cache = tmp_path / "cache"
    naive = naive_baselines(config, {"site-1": site_1, "site-2": site_2, "site-3": site_3}, cache)
    assert naive.sites == ["site-1", "site-2"] and list(naive.predictors) == list(BASELINE_NAMES)
    loaded = [load_site(d, config.data, cache_dir=cache) for d in (site_1, site_2)]
    direct = IntensityStats.merge_all([site_statistics(s) for s in loaded])
    np.testing.assert_array_equal(naive.statistics.pair_counts, direct.pair_counts)
    np.testing.assert_array_equal(naive.statistics.target_counts, direct.target_counts)
    assert (naive.statistics.pairs, naive.statistics.volumes) == (3, 4)  # pairs; T2w volumes
    voxels = sum(int(PairedSlices([p]).masks.sum()) for s in loaded for p in s.paired)
    assert naive.statistics.paired_voxels == voxels
    # Scored on the test sets like a model, in the evaluation mask; the sample slice too.
    tests = TestSets(config, {"site-1": (site_1, test)}, cache)
    per_site, mean = tests.evaluate_predictor(naive.predictors[LOOKUP_TABLE])
    ((_, paired),) = tests.pairs["site-1"]
    table = LookupTableBaseline.from_stats(direct)
    predicted = table(paired.a, paired.masks.astype(bool))
    error = [
        np.abs((p[m] - t[m]) / 2).mean()
        for p, t, m in zip(predicted, paired.b, paired.masks.astype(bool), strict=True)
        if m.any()
    ]
    assert per_site["site-1"]["mae_masked"] == pytest.approx(np.mean(error), abs=1e-6)
    assert mean["mae_masked"] == pytest.approx(per_site["site-1"]["mae_masked"])
    (sample,) = tests.samples({}, tmp_path, {LOOKUP_TABLE: naive.predictors[LOOKUP_TABLE]})
    saved = np.load(tmp_path / sample.path)
    np.testing.assert_allclose(saved["lookup_table"], predicted[sample.slice_index], atol=1e-6)


@pytest.mark.slow
def test_simulate_end_to_end(tmp_path: Path) -> None:
    """``fedsynth simulate`` on three tiny phantom hospitals: every phase, the report, resume."""
    from typer.testing import CliRunner

    from fedsynth.cli.main import app
    from fedsynth.simulations.results import ExperimentResults

    folder = tmp_path / "exp"
    args = [
        "simulate", "--run-dir", str(folder), "--preset", "cpu-small",
        "--set", "data.spacing_mm=[6, 6, 6]", "--set", "data.image_size=32",
        "--set", "model.ngf=8", "--set", "model.n_blocks=1", "--set", "model.ndf=8",
        "--set", "model.d_layers=1", "--set", "federation.rounds=2",
        "--set", "simulation.num_sites=3", "--set", "simulation.subjects=[3, 2, 1]",
        "--set", "simulation.phantom_voxel_mm=4",
        "--set", "simulation.misalignment=['none', 'slight', 'none']",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    results = ExperimentResults.read(folder)
    names = [m.name for m in results.models]
    assert names[:2] == ["untrained", "federated"]
    assert {"pooled", "local:site-1", "local:site-2", "local:site-3"} <= set(names)
    assert [p.round for p in results.rounds] == [0, 1, 2]
    assert results.rounds[0].mean == results.model("untrained").mean  # type: ignore[union-attr]
    # Same compute: the local baselines ran rounds x local epochs.
    assert results.model("local:site-1").epochs == 2  # type: ignore[union-attr]
    # The federated model's score is an independent recomputation from its checkpoint.
    federated = results.model("federated")
    assert federated is not None and federated.checkpoint is not None
    sample = np.load(folder / results.samples[0].path)
    target, mask = to_unit(sample["target"]), sample["mask"]
    assert mask.any() and sample["federated"].shape == target.shape
    # The naive baselines: from the three training sites' statistics, on the same test sets.
    assert results.naive["sites"] == ["site-1", "site-2", "site-3"]
    for name in ("constant", "histogram matching", "lookup table"):
        naive = results.model(name)
        assert naive is not None and naive.skipped is None, name
        assert set(naive.per_site) == set(federated.per_site)
        assert math.isfinite(naive.mean["psnr_masked"])
    assert "lookup_table" in sample.files
    report = (folder / "report.md").read_text()
    assert "site-3" in report and "federated" in report
    assert "the best naive baseline" in report and "`lookup table`" in report
    federation = (folder / "federated" / "config.resolved.toml").read_text()
    assert "evaluate_sites = false" not in federation  # the sites validate every round
    # The federated model scored is the round the sites' validation data chose (best.json).
    best = json.loads((folder / "federated" / "best.json").read_text())
    chosen = results.model("federated")
    assert chosen is not None and chosen.selected is not None
    assert chosen.selected.startswith(f"round {best['round']} of 2")
    assert chosen.mean == results.rounds[best["round"]].mean
    assert best["score"] == max(
        json.loads(line)["aggregated"]["eval/psnr_masked"]
        for line in (folder / "federated" / "rounds.jsonl").read_text().splitlines()
    )
    assert 'misalignment = "slight"' in federation  # the most severe site decides R
    record = json.loads((folder / "phases.json").read_text())
    assert {"split", "federated", "pooled", "local:site-1", "evaluate"} <= set(record["done"])
    # Resume: every phase is skipped, the results stay.
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "skipped" in again.output
    assert ExperimentResults.read(folder).model("federated").mean == federated.mean  # type: ignore[union-attr]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "--resume" in refused.output


def test_a_warm_started_experiment_scores_its_starting_point_as_round_zero(
    tmp_path: Path,
) -> None:
    """With ``federation.warm_start``, round 0 of the curve is the warm start the sites first
    received (scored as the model "starting point"), not random weights."""
    from typer.testing import CliRunner

    from fedsynth.cli.main import app
    from fedsynth.simulations.results import STARTING_POINT, ExperimentResults

    folder = tmp_path / "exp"
    args = [
        "simulate", "--run-dir", str(folder), "--preset", "cpu-small",
        "--set", "data.spacing_mm=[6, 6, 6]", "--set", "data.image_size=32",
        "--set", "model.ngf=8", "--set", "model.ndf=8", "--set", "model.d_layers=1",
        "--set", "federation.rounds=1", "--set", "federation.local_steps=2",
        "--set", "federation.warm_start=phantom", "--set", "federation.warm_start_steps=6",
        "--set", "federation.warm_start_subjects=2",
        "--set", "simulation.num_sites=2", "--set", "simulation.subjects=[2, 1]",
        "--set", "simulation.phantom_voxel_mm=4", "--set", "simulation.engine=inprocess",
        "--set", "simulation.baselines=[]",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = ExperimentResults.read(folder)
    start = results.model(STARTING_POINT)
    untrained = results.model("untrained")
    assert start is not None and untrained is not None and start.steps == 6
    assert start.selected is not None and "no site data" in start.selected
    assert results.rounds[0].mean == start.mean != untrained.mean
    run = json.loads((folder / "federated" / "run.json").read_text())
    assert start.checkpoint == run["initial_generators"]["path"]
    assert (folder / "federated").parent / "warm-starts" in Path(start.checkpoint).parents


def test_results_keep_nan_and_inf_through_json(tmp_path: Path) -> None:
    from fedsynth.simulations.results import ExperimentResults, ModelResult, SplitSummary

    results = ExperimentResults(
        name="x",
        direction="T1w->T2w",
        split=SplitSummary(scheme="counts", sites=[]),
        models=[ModelResult(name="federated", mean={"psnr": math.inf, "lesion_psnr": math.nan})],
    )
    back = ExperimentResults.read(results.write(tmp_path))
    mean = back.models[0].mean
    assert mean["psnr"] == math.inf and math.isnan(mean["lesion_psnr"])


def test_grid_runs_every_cell_survives_a_failure_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsynth.simulations.grid as grid_module
    from fedsynth.simulations.results import ExperimentResults, ModelResult, SplitSummary

    calls: list[tuple[str, str, float | None]] = []

    def fake_experiment(config, *, folder, variant, **_: object) -> ExperimentResults:  # type: ignore[no-untyped-def]
        calls.append((folder.name, config.federation.strategy, config.privacy.target_epsilon))
        if variant == {"privacy": "eps4", "strategy": "fedprox"}:
            raise RuntimeError("this cell breaks")
        folder.mkdir(parents=True, exist_ok=True)
        psnr = 20.0 + (config.privacy.target_epsilon or 10.0)
        results = ExperimentResults(
            name=config.name,
            direction=config.data.direction,
            variant=dict(variant),
            split=SplitSummary(scheme="counts", sites=[]),
            models=[ModelResult(name="federated", mean={"psnr_masked": psnr})],
        )
        results.write(folder)
        return results

    monkeypatch.setattr(grid_module, "run_experiment", fake_experiment)
    config = tmp_path / "grid.toml"
    config.write_text(
        """
[simulation.grid.privacy]
off = []
eps4 = ["privacy.enabled=true", "privacy.target_epsilon=4"]
[simulation.grid.strategy]
fedavg = ["federation.strategy=fedavg"]
fedprox = ["federation.strategy=fedprox"]
"""
    )
    report = grid_module.run_grid(
        config, "cpu-small", [], folder=tmp_path / "grid", echo=lambda _: None
    )
    assert [c[1:] for c in calls] == [
        ("fedavg", None), ("fedprox", None), ("fedavg", 4.0), ("fedprox", 4.0),
    ]  # fmt: skip
    text = report.read_text()
    for label in ("privacy=off,strategy=fedavg", "privacy=eps4,strategy=fedprox"):
        assert label in text
    assert "not run / failed" in text  # the broken cell is listed, the others survived
    # Resume: finished cells are skipped, the failed one is tried again.
    calls.clear()
    grid_module.run_grid(
        config, "cpu-small", [], folder=tmp_path / "grid", resume=True, echo=lambda _: None
    )
    assert [c[1:] for c in calls] == [("fedprox", 4.0)]


def test_ray_resources_and_cluster_reach_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpus/gpus per site go into `flwr run --federation-config`; a Ray address into the
    SuperLink's environment (the simulation's ray.init reads RAY_ADDRESS)."""
    import fedsynth.common.flower_processes as flower
    import fedsynth.server.service as launch

    seen: dict[str, object] = {}

    def fake_flwr(args: list[str], flwr_home: Path, timeout: float = 120.0) -> str:
        seen["args"] = args
        return json.dumps({"success": True, "run-id": 7})

    monkeypatch.setattr(flower, "flwr", fake_flwr)
    run_id = flower.submit_run(
        tmp_path, "fedsynth", tmp_path, {"a": 1}, num_supernodes=50, cpus_per_node=2,
        gpus_per_node=0.25,
    )  # fmt: skip
    args = seen["args"]
    assert run_id == 7 and isinstance(args, list)
    federation = args[args.index("--federation-config") + 1]
    assert federation.split() == [
        "num-supernodes=50", "client-resources-num-cpus=2", "client-resources-num-gpus=0.25",
    ]  # fmt: skip

    def fake_start(**kwargs: object) -> object:
        seen["env"] = kwargs.get("env")
        raise RuntimeError("stop here")

    monkeypatch.setattr(launch, "start_superlink", fake_start)
    options = launch.ServeOptions(
        run_dir=tmp_path, insecure=True, simulation=True, ray_address="ray://head:10001"
    )
    with pytest.raises(RuntimeError, match="stop here"), launch.Superlink(options):
        pass
    assert seen["env"] == {"RAY_ADDRESS": "ray://head:10001"}


def test_a_simulated_site_with_unusable_files_is_named_and_left_out_of_local_training(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    from fedsynth.simulations.split import count_slices
    from tests.intake import BAD_KINDS

    config = tiny_config()
    good = make_site("site-1")
    damaged = make_site("site-2")
    BAD_KINDS["units50mm"].write(damaged / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    folders = {"site-1": (good, None), "site-2": (damaged, None)}
    counts, unusable = count_slices(config, folders, tmp_path / "cache")
    assert counts["site-1"]["a"] > 0 and counts["site-2"] == {"a": 0, "b": 0}
    assert list(unusable) == ["site-2"]
    assert unusable["site-2"].startswith("unusable files: 1 scan(s)")
    skipping = config.model_copy(update={"data": config.data.model_copy(update={"skip_bad": True})})
    counts, unusable = count_slices(skipping, folders, tmp_path / "cache")
    assert not unusable and counts["site-2"]["a"] > 0
