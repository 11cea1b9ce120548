"""Reports: every figure referenced exists (and only those), the tables hold the numbers put in
(checked against sums and differences computed here), absent data gives a note or "–" rather
than a crash, and a grid report survives a cell that never ran."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedsynth.simulations.report import (
    MISSING,
    extract,
    headline_lines,
    write_grid_report,
    write_report,
)
from fedsynth.simulations.results import (
    CONSTANT,
    FEDERATED,
    HISTOGRAM,
    LOOKUP_TABLE,
    POOLED,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
    RoundPoint,
    SampleSlices,
    SiteSplit,
    SplitSummary,
    local_model,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Mean masked metrics per model: (PSNR, SSIM, MAE). Pooled has the best PSNR and SSIM, the
# federated model the best MAE, so the bold marks land on different rows. The lookup table is
# the best naive baseline, 1.79 dB below the federated model.
MEANS = {
    UNTRAINED: (19.9034, 0.4123, 0.0912),
    CONSTANT: (14.0021, 0.2101, 0.1403),
    HISTOGRAM: (21.5550, 0.5012, 0.0710),
    LOOKUP_TABLE: (24.7000, 0.7555, 0.0455),
    FEDERATED: (26.4871, 0.8012, 0.0301),
    POOLED: (27.2513, 0.8345, 0.0315),
    local_model("site-1"): (23.1049, 0.7011, 0.0511),
    local_model("site-2"): (25.0066, 0.7702, 0.0402),
}
UNTRAINED_OR_NAIVE = (UNTRAINED, CONSTANT, HISTOGRAM, LOOKUP_TABLE)
SITES = [
    SiteSplit(
        site="site-1",
        train_subjects=4,
        subjects_a=3,
        subjects_b=2,
        slices_a=30,
        slices_b=20,
        test_subjects=1,
        test_slices=10,
        unpaired_fraction=0.5,
        scanner={"field_strength_t": 1.5, "voxel_size_mm": [1.0, 1.0, 1.2]},
    ),
    SiteSplit(
        site="site-2",
        train_subjects=10,
        subjects_a=10,
        subjects_b=10,
        slices_a=100,
        slices_b=100,
        test_subjects=2,
        test_slices=20,
        misalignment="rigid",
        scanner={"field_strength_t": 3.0},
    ),
    SiteSplit(
        site="site-3",
        train_subjects=7,
        subjects_a=7,
        subjects_b=0,
        slices_a=70,
        test_subjects=1,
        test_slices=10,
        missing=["B"],
        excluded="no T2w scans",
    ),
]
EPSILON = {  # cumulative epsilon per round and site
    1: {"site-1": 1.2345, "site-2": 0.9, "site-3": 0.5},
    2: {"site-1": 2.5, "site-2": 1.7, "site-3": 1.0},
    3: {"site-1": 3.7712, "site-2": 2.4049, "site-3": 1.5},
}


def site_metrics(psnr: float, ssim: float, mae: float, shift: float) -> dict[str, float]:
    return {
        "psnr_masked": psnr + shift,
        "ssim_masked": ssim,
        "mae_masked": mae,
        "psnr": psnr + 1.0,
        "kspace_low": 0.1 + mae,
        "kspace_mid": 0.2 + mae,
        "kspace_high": 0.4 + mae,
    }


def make_results(privacy: bool) -> ExperimentResults:
    models = []
    for name, (psnr, ssim, mae) in MEANS.items():
        per_site = {
            site.site: site_metrics(psnr, ssim, mae, shift)
            for site, shift in zip(SITES, (-0.5, 0.5, 0.0), strict=True)
        }
        models.append(
            ModelResult(
                name=name,
                per_site=per_site,
                mean=site_metrics(psnr, ssim, mae, 0.0),
                train_seconds=0.0 if name in UNTRAINED_OR_NAIVE else 123.4,
                epochs=0 if name in UNTRAINED_OR_NAIVE else 6,
            )
        )
    models.append(ModelResult(name=local_model("site-3"), skipped="site-3 has no domain B"))
    rounds = []
    for r in range(4):
        fed = MEANS[FEDERATED]
        fraction = r / 3
        mean = site_metrics(
            19.9 + fraction * (fed[0] - 19.9), 0.4 + fraction * 0.4, fed[2] + 0.01 * (3 - r), 0.0
        )
        rounds.append(
            RoundPoint(
                round=r,
                mean=mean,
                per_site={site.site: dict(mean) for site in SITES},
                epsilon=EPSILON.get(r, {}) if privacy else {},
                bytes_up={"site-1": 1_234_567 * r, "site-2": 2_000_001 * r} if r else {},
                bytes_down={"site-1": 3_100_000 * r, "site-2": 3_100_000 * r} if r else {},
                seconds=0.0 if r == 0 else 40.0 + r,
            )
        )
    return ExperimentResults(
        name="demo-exp",
        direction="T1w->T2w",
        preset="phantom-small",
        variant={"lr": 0.0002, "local_epochs": 2},
        split=SplitSummary(
            scheme="dirichlet", parameters={"alpha": 0.5}, seed=7, pool="phantom", sites=SITES
        ),
        models=models,
        rounds=rounds,
        samples=[
            SampleSlices(site="site-1", path="samples/site-1.npz", subject="sub-01", slice_index=8)
        ],
        privacy=(
            {
                "enabled": True,
                "level": "patient",
                "delta": 1e-5,
                "noise_multiplier": 1.1,
                "budget_epsilon": 4.0,
            }
            if privacy
            else {"enabled": False}
        ),
        timing={"data": 12.3, "federated": 164.0, "pooled": 80.0},
        machine="test machine, 2 CPU",
    )


def write_sample(folder: Path) -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (16, 16)).astype(np.float32)
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:13, 3:13] = True
    arrays = {
        "source": rng.uniform(-1, 1, (16, 16)).astype(np.float32),
        "target": target,
        "mask": mask,
        "untrained": np.zeros((16, 16), np.float32),
        "federated": np.clip(target + 0.1, -1, 1),
        "lookup_table": np.clip(target - 0.05, -1, 1),  # " " stored as "_"
        "local_site-1": np.clip(target - 0.2, -1, 1),  # ":" stored as "_"
    }
    (folder / "samples").mkdir(parents=True)
    np.savez(folder / "samples" / "site-1.npz", **arrays)


def experiment(folder: Path, privacy: bool) -> tuple[Path, str]:
    results = make_results(privacy)
    results.write(folder)
    write_sample(folder)
    path = write_report(folder)
    return path, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return experiment(tmp_path_factory.mktemp("private"), privacy=True)


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return experiment(tmp_path_factory.mktemp("public"), privacy=False)


def section(text: str, title: str) -> str:
    """The text of the ``## title`` (or ``### title``) section, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def table(text: str) -> list[list[str]]:
    """The rows (header first, rule dropped) of the first Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return [rows[0], *rows[2:]]


def row_of(rows: list[list[str]], first: str) -> list[str]:
    return next(row for row in rows if row[0] == first)


def figure_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


@pytest.mark.parametrize("name", ["private", "public"])
def test_every_figure_is_a_png_and_every_png_is_referenced(
    name: str, request: pytest.FixtureRequest
) -> None:
    path, text = request.getfixturevalue(name)
    links = figure_links(text)
    assert links
    for link in links:
        data = (path.parent / link).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, link
    on_disk = {p.name for p in (path.parent / "figures").glob("*.png")}
    assert on_disk == {Path(link).name for link in links}
    assert {"curves.png", "sites.png", "kspace.png", "samples-site-1.png"} <= on_disk


def test_title_names_the_experiment_and_links_the_config(private: tuple[Path, str]) -> None:
    _, text = private
    assert text.startswith("# demo-exp: T1w->T2w")
    assert "phantom-small" in text and "lr=0.0002" in text and "test machine, 2 CPU" in text
    assert "[config.resolved.toml](config.resolved.toml)" in text


def test_headline_table_numbers_delta_and_bold(private: tuple[Path, str]) -> None:
    _, text = private
    rows = table(section(text, "Headline"))
    federated = row_of(rows, f"`{FEDERATED}`")
    assert federated[1] == f"{MEANS[FEDERATED][0]:.2f}" == "26.49"
    expected_delta = MEANS[FEDERATED][0] - MEANS[UNTRAINED][0]  # 6.5837
    assert federated[6] == f"+{expected_delta:.2f}" == "+6.58"
    assert federated[3] == "**0.0301**"  # best (lowest) MAE
    pooled = row_of(rows, f"`{POOLED}`")
    assert pooled[1] == "**27.25**" and pooled[2] == "**0.835**"
    bold_psnr = [row[0] for row in rows[1:] if row[1].startswith("**")]
    assert bold_psnr == [f"`{POOLED}`"]
    assert [row[0] for row in rows[1:]] == [
        "`untrained`",
        "`constant`",
        "`histogram matching`",
        "`lookup table`",
        "`federated`",
        "`pooled`",
        "`local:site-1`",
        "`local:site-2`",
        "`local:site-3`",
    ]
    skipped = row_of(rows, "`local:site-3`")
    assert skipped[1] == MISSING and "site-3 has no domain B" in skipped[-1]


def test_split_table_has_one_row_per_site_with_its_counts(private: tuple[Path, str]) -> None:
    _, text = private
    body = section(text, "Split")
    assert "`dirichlet` (alpha=0.5); seed 7; pool: phantom" in body
    rows = table(body)
    header = rows[0]
    assert [row[0] for row in rows[1:]] == ["site-1", "site-2", "site-3"]
    for site in SITES:
        row = dict(zip(header, row_of(rows, site.site), strict=True))
        assert row["Train subjects"] == str(site.train_subjects)
        assert row["With A"] == str(site.subjects_a)
        assert row["With B"] == str(site.subjects_b)
        assert row["Slices A"] == str(site.slices_a)
        assert row["Test slices"] == str(site.test_slices)
    site_1 = dict(zip(header, row_of(rows, "site-1"), strict=True))
    assert site_1["Scanner"] == "1.5 T, 1×1×1.2 mm" and site_1["Unpaired"] == "0.50"
    site_3 = dict(zip(header, row_of(rows, "site-3"), strict=True))
    assert site_3["Missing"] == "B" and site_3["Excluded"] == "no T2w scans"


def test_privacy_on_lists_each_sites_final_epsilon(private: tuple[Path, str]) -> None:
    path, text = private
    body = section(text, "Privacy")
    assert "figures/epsilon.png" in body
    assert "δ = 1e-05" in body and "unit: **patient-level**" in body and "σ = 1.1" in body
    rows = table(body)
    finals = {row[0]: row[1] for row in rows[1:]}
    assert finals == {site: f"{eps:.2f}" for site, eps in EPSILON[3].items()}
    assert (path.parent / "figures" / "epsilon.png").is_file()


def test_privacy_off_draws_no_epsilon(public: tuple[Path, str]) -> None:
    path, text = public
    assert "epsilon.png" not in text
    assert not (path.parent / "figures" / "epsilon.png").exists()
    assert "privacy was off" in section(text, "Privacy")


def test_bytes_table_total_is_the_sum_over_rounds_and_sites(private: tuple[Path, str]) -> None:
    _, text = private
    rows = table(section(text, "Bytes moved per round"))
    results = make_results(privacy=True)
    up = sum(b for point in results.rounds for b in point.bytes_up.values()) / 1e6
    down = sum(b for point in results.rounds for b in point.bytes_down.values()) / 1e6
    total = row_of(rows, "**total**")
    assert total[1] == f"**{up:.2f}**" == "**19.41**"
    assert total[2] == f"**{down:.2f}**"
    assert [row[0] for row in rows[1:-1]] == ["1", "2", "3"]  # round 0 moved nothing
    timing = row_of(table(section(text, "Time per phase")), "**total**")
    assert timing[1] == f"**{12.3 + 164.0 + 80.0:.0f}**"


def test_frequency_band_table_marks_the_lowest_error(private: tuple[Path, str]) -> None:
    _, text = private
    rows = table(section(text, "Frequency bands"))
    federated = row_of(rows, f"`{FEDERATED}`")
    assert federated[1] == f"**{0.1 + MEANS[FEDERATED][2]:.3f}**"


def test_missing_metric_keys_render_a_dash(tmp_path: Path) -> None:
    results = make_results(privacy=False)
    federated = results.model(FEDERATED)
    assert federated is not None
    del federated.mean["ssim_masked"]
    for key in ("kspace_low", "kspace_mid", "kspace_high"):
        del federated.mean[key]
    del results.rounds[-1].per_site["site-2"]["mae_masked"]
    results.samples = []
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    row = row_of(table(section(text, "Headline")), f"`{FEDERATED}`")
    assert row[2] == MISSING and row[1] == "26.49"
    per_site = row_of(table(section(text, "Federated model after round 3, per site")), "site-2")
    assert per_site[3] == MISSING
    assert f"`{FEDERATED}`" not in section(text, "Frequency bands")
    assert "No sample slices" in section(text, "Samples")


def test_absent_sections_get_a_note(tmp_path: Path) -> None:
    results = ExperimentResults(
        name="empty",
        direction="T1w->T2w",
        split=SplitSummary(scheme="counts", sites=[]),
        models=[ModelResult(name=FEDERATED, mean={})],
        privacy={"enabled": True},
    )
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "No per-round evaluation" in text and "No per-round epsilon" in text
    assert "No federated traffic" in text and "No timing" in text
    figures = tmp_path / "figures"
    assert not figures.exists() or not list(figures.glob("*.png"))


def test_rewriting_a_report_drops_its_stale_figures(tmp_path: Path) -> None:
    make_results(privacy=True).write(tmp_path)
    write_report(tmp_path)
    assert (tmp_path / "figures" / "epsilon.png").is_file()
    write_report(tmp_path, make_results(privacy=False))
    assert not (tmp_path / "figures" / "epsilon.png").exists()


def test_a_broken_sample_file_is_noted_not_fatal(tmp_path: Path) -> None:
    results = make_results(privacy=False)
    results.rounds = []
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "site-1.npz").write_bytes(b"not a zip")
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "Sample not drawn" in section(text, "site-1 (sub-01, slice 8)")


def test_grid_report_lists_every_cell_and_names_the_best(tmp_path: Path) -> None:
    cells = []
    for label, shift in (("lr=1e-4", 0.0), ("lr=2e-4", 1.5)):
        folder = tmp_path / label
        results = make_results(privacy=True)
        federated = results.model(FEDERATED)
        assert federated is not None
        federated.mean["psnr_masked"] += shift
        results.write(folder)
        write_report(folder, results)
        cells.append((label, folder))
    cells.append(("lr=5e-4", tmp_path / "never-ran"))
    path = write_grid_report(tmp_path / "grid", cells)
    text = path.read_text(encoding="utf-8")
    rows = table(text)
    assert [row[0] for row in rows[1:]] == ["lr=1e-4", "lr=2e-4", "lr=5e-4"]
    best = row_of(rows, "lr=2e-4")
    assert best[1] == f"**{MEANS[FEDERATED][0] + 1.5:.2f}**"
    assert best[-1] == "[report.md](../lr=2e-4/report.md)"
    assert best[-3] == f"{max(EPSILON[3].values()):.2f} (patient-level)"
    assert "not run / failed" in row_of(rows, "lr=5e-4")[-1]
    assert "Best cell by federated mean masked PSNR: **lr=2e-4**" in text
    for link in figure_links(text):
        assert (path.parent / link).read_bytes().startswith(PNG_MAGIC)
    assert figure_links(text) == ["figures/grid.png"]


def test_headline_lines_name_federated_and_smallest_local() -> None:
    lines = headline_lines(make_results(privacy=True))
    assert 3 <= len(lines) <= 6
    text = "\n".join(lines)
    assert "federated: PSNR 26.49 dB" in text
    smallest = next(line for line in lines if "smallest site" in line)
    assert "site-1" in smallest and "23.10" in smallest  # site-1: 4 training subjects
    assert "+6.58 dB vs untrained" in text
    assert "worst patient-level epsilon 3.77" in text and "4 min 16 s" in text


def test_many_local_models_show_only_the_smallest_and_largest_in_figures(tmp_path: Path) -> None:
    sizes = [5, 2, 9, 4, 7, 3, 8]  # smallest: site-b (2), largest: site-c (9)
    names = [f"site-{chr(ord('a') + i)}" for i in range(len(sizes))]
    sites = [
        SiteSplit(site=n, train_subjects=k, subjects_a=k, subjects_b=k)
        for n, k in zip(names, sizes, strict=True)
    ]
    models = [ModelResult(name=FEDERATED, mean={"psnr_masked": 25.0})]
    models += [
        ModelResult(name=local_model(n), mean={"psnr_masked": 20.0 + k}, per_site={n: {}})
        for n, k in zip(names, sizes, strict=True)
    ]
    results = ExperimentResults(
        name="many",
        direction="T1w->T2w",
        split=SplitSummary(scheme="counts", sites=sites),
        models=models,
        rounds=[RoundPoint(round=0, mean={"psnr_masked": 10.0})],
    )
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "smallest and largest sites only" in section(text, "Per-round curves")
    drawn, trimmed = extract._baselines(results)  # the dashed lines of the curves figure
    assert trimmed and [m.name for m in drawn] == ["local:site-b", "local:site-c"]
    rows = table(section(text, "Headline"))
    assert len(rows) == 1 + 1 + len(sizes)  # the table still lists every model
    assert row_of(rows, "`local:site-c`")[1] == "**29.00**"
    assert "local-only, smallest site site-b, 2 subjects: PSNR 22.00" in "\n".join(
        headline_lines(results)
    )


def test_the_report_says_where_federated_stands_against_the_best_naive_baseline(
    private: tuple[Path, str], tmp_path: Path
) -> None:
    _, text = private
    gap = MEANS[FEDERATED][0] - MEANS[LOOKUP_TABLE][0]  # 1.7871
    sentence = f"**The federated model is {gap:.2f} dB above the lookup table**"
    assert sentence == "**The federated model is 1.79 dB above the lookup table**"
    assert sentence in section(text, "Headline")
    assert f"SSIM {MEANS[FEDERATED][1]:.3f} against {MEANS[LOOKUP_TABLE][1]:.3f}" in text
    # A lookup table above the federated model: said as plainly.
    results = make_results(privacy=False)
    table_model = results.model(LOOKUP_TABLE)
    assert table_model is not None
    table_model.mean["psnr_masked"] = 28.0
    results.samples = []
    body = section(write_report(tmp_path / "a", results).read_text(), "Headline")
    assert f"**The federated model is {28.0 - MEANS[FEDERATED][0]:.2f} dB below the lookup " in body
    # The best naive baseline is whichever scores best: histogram matching here.
    results.models = [m for m in results.models if m.name != LOOKUP_TABLE]
    body = section(write_report(tmp_path / "b", results).read_text(), "Headline")
    gap = MEANS[FEDERATED][0] - MEANS[HISTOGRAM][0]
    assert f"is {gap:.2f} dB above the histogram matching**" in body
    # No naive baseline (results from before they were scored): said, not hidden.
    results.models = [m for m in results.models if m.name not in (CONSTANT, HISTOGRAM)]
    body = section(write_report(tmp_path / "c", results).read_text(), "Headline")
    assert "No naive baseline was scored" in body


def test_per_site_table_lists_the_baselines_and_the_gap_to_the_best_one(
    private: tuple[Path, str],
) -> None:
    _, text = private
    rows = table(section(text, "Per-site results"))
    header = rows[0]
    for name in (CONSTANT, HISTOGRAM, LOOKUP_TABLE, FEDERATED, POOLED):
        assert f"`{name}`" in header
    assert header[-1] == "Federated − best naive (dB)"
    for site, shift in zip(("site-1", "site-2", "site-3"), (-0.5, 0.5, 0.0), strict=True):
        row = dict(zip(header, row_of(rows, site), strict=True))
        psnr, ssim, _ = MEANS[LOOKUP_TABLE]
        assert row[f"`{LOOKUP_TABLE}`"] == f"{psnr + shift:.2f} / {ssim:.3f}"
        assert row[f"`{POOLED}`"].startswith("**")  # the best PSNR of the site
        gap = MEANS[FEDERATED][0] - MEANS[LOOKUP_TABLE][0]  # the same shift at every model
        assert row["Federated − best naive (dB)"] == f"+{gap:.2f}"


def test_terminal_lines_and_grid_report_show_the_lookup_table(tmp_path: Path) -> None:
    results = make_results(privacy=True)
    gap = MEANS[FEDERATED][0] - MEANS[LOOKUP_TABLE][0]
    assert f"+{gap:.2f} dB vs lookup table" in "\n".join(headline_lines(results))
    results.write(tmp_path / "cell")
    text = write_grid_report(tmp_path / "grid", [("only", tmp_path / "cell")]).read_text()
    rows = table(text)
    column = rows[0].index("Lookup table PSNR")
    assert rows[1][column] == f"{MEANS[LOOKUP_TABLE][0]:.2f}"
    assert rows[1][column + 1] == f"{MEANS[LOOKUP_TABLE][1]:.3f}"
