"""DP across federated rounds: reported epsilon, persistence, budgets, the record.

Patient-level DP-SGD (the default) and slice-level (``privacy.level = "example"``) through the
real Coordinator and ClientApp over the in-process transport; every epsilon is recomputed from
(noise multiplier, sample rate over patients or examples, steps) with Opacus' RDP analysis
functions, the populations counted from the sites' volumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis
from safetensors.numpy import load_file

from fedsynth.client.local import train_local
from fedsynth.common.config import RunConfig
from fedsynth.common.messages import ARRAYS, METRICS, from_record
from fedsynth.common.privacy.accounting import RDP_ORDERS, SiteAccountant
from fedsynth.common.privacy.plan import NoisePlan
from fedsynth.common.synthesis import Synthesizer
from fedsynth.server.cli import console, render_status
from fedsynth.server.coordinator import ROUNDS_LOG, Coordinator, CoordinatorStoppedError
from fedsynth.server.round_store import round_dir
from fedsynth.server.status import read_status
from fedsynth.simulations.engines.inprocess import InProcessGrid, tiny_config
from tests.conftest import training_examples, training_patients

SIGMA = 1.1
STEPS = 2  # local steps per round
LEVELS = ("patient", "example")
# Patient level trains the A->B networks, G_AB and D_B; example level all four (G_AB, G_BA,
# D_A, D_B). No misalignment, so no R.
NETWORKS = {"patient": 2, "example": 4}
# One patient per expected batch: the sites' 3, 2 and 1 patients give sample rates 1/3, 1/2, 1.
PATIENT_BATCH = 1


def _config(*extra: str, level: str = "patient") -> RunConfig:
    return tiny_config(
        "privacy.enabled=true",
        f"privacy.level={level}",
        f"privacy.batch_size={PATIENT_BATCH if level == 'patient' else 4}",
        f"privacy.noise_multiplier={SIGMA}",
        "privacy.accountant=rdp",
        "privacy.max_grad_norm=0.5",
        f"federation.local_steps={STEPS}",
        "federation.evaluate_sites=false",
        *extra,
    )


def _grid(sites: list[Path], tmp: Path) -> InProcessGrid:
    nodes = {
        i: {"data-dir": str(site), "state-dir": str(tmp / f"state-{i}")}
        for i, site in enumerate(sites, start=1)
    }
    return InProcessGrid(nodes, names={i: s.name for i, s in enumerate(sites, start=1)})


def _examples(site: Path, config: RunConfig, cache: Path) -> int:
    """What the site's Poisson sampling runs over: its patients, or its training examples."""
    if config.privacy.level == "patient":
        return training_patients(site, config, cache)
    return training_examples(site, config, cache)


def _rate(examples: int, config: RunConfig) -> float:
    return min(1.0, (config.privacy.batch_size or config.training.batch_size) / examples)


def _independent_epsilon(examples: int, config: RunConfig, steps: int) -> float:
    networks = NETWORKS[config.privacy.level]
    rdp = rdp_analysis.compute_rdp(
        q=_rate(examples, config),
        noise_multiplier=SIGMA / math.sqrt(networks),
        steps=steps,
        orders=RDP_ORDERS,
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=config.privacy.delta)
    return float(eps)


def _reported(grid: InProcessGrid) -> dict[tuple[int, int], float]:
    """``(node, round) -> epsilon`` from every train reply, in order."""
    out: dict[tuple[int, int], float] = {}
    counts: dict[int, int] = {}
    for node, reply in grid.replies:
        if reply.metadata.message_type != "train" or reply.has_error():
            continue
        counts[node] = counts.get(node, 0) + 1
        out[(node, counts[node])] = float(reply.content.metric_records[METRICS]["epsilon"])
    return out


@pytest.mark.parametrize("level", LEVELS)
def test_each_site_reports_cumulative_epsilon_that_opacus_recomputes(
    sites: list[Path], tmp_path: Path, level: str
) -> None:
    config = _config("federation.rounds=3", "federation.min_sites=3", level=level)
    grid = _grid(sites, tmp_path)
    summaries = Coordinator(grid, config, tmp_path / "run").run()
    reported = _reported(grid)
    examples = {i: _examples(s, config, tmp_path / "cache") for i, s in enumerate(sites, start=1)}
    assert len(set(examples.values())) > 1  # unequal sites: unequal sample rates

    for node, count in examples.items():
        for round_number in (1, 3):
            expected = _independent_epsilon(count, config, STEPS * round_number)
            assert reported[(node, round_number)] == pytest.approx(expected, rel=1e-9)
        # Persistence: round 2's figure equals one uninterrupted accountant over the same steps.
        plan = NoisePlan(
            sample_rate=_rate(count, config),
            noise_multiplier=SIGMA,
            networks=NETWORKS[level],
            steps_per_round=STEPS,
            planned_steps=STEPS * 3,
            examples=count,
        )
        whole = SiteAccountant("rdp", config.privacy.delta)
        for _ in range(2 * STEPS):
            whole.step(plan)
        assert reported[(node, 2)] == pytest.approx(whole.epsilon(), abs=1e-6)
        assert reported[(node, 1)] < reported[(node, 2)] < reported[(node, 3)]

    # The coordinator's record: every site's epsilon and the worst, each round.
    names = {i: s.name for i, s in enumerate(sites, start=1)}
    for summary in summaries:
        assert summary.epsilon == {names[n]: reported[(n, summary.round)] for n in names}
        assert summary.worst_epsilon == max(summary.epsilon.values())
        meta = json.loads(
            (round_dir(tmp_path / "run", summary.round) / "checkpoint.json").read_text()
        )
        assert meta["privacy"]["worst_epsilon"] == pytest.approx(summary.worst_epsilon)
        assert meta["privacy"]["delta"] == config.privacy.delta
    # `fedsynth status` says what one epsilon protects.
    with console.capture() as shown:
        render_status(read_status(tmp_path / "run"))
    unit = {"patient": "per patient", "example": "per training slice"}[level]
    assert f"cumulative per site, at delta 1e-05, {unit}" in shown.get()
    lines = (tmp_path / "run" / ROUNDS_LOG).read_text().splitlines()
    assert [json.loads(line)["worst_epsilon"] for line in lines] == [
        s.worst_epsilon for s in summaries
    ]


def _budget_between_rounds(examples: int, config: RunConfig, rounds: int) -> float:
    """A budget that allows ``rounds`` rounds of the site and not one more."""
    low = _independent_epsilon(examples, config, STEPS * rounds)
    high = _independent_epsilon(examples, config, STEPS * (rounds + 1))
    return (low + high) / 2


def test_a_site_stops_training_at_the_round_that_would_pass_its_budget(
    sites: list[Path], tmp_path: Path
) -> None:
    base = _config("federation.rounds=4", "federation.min_sites=1")
    # The smallest site has the highest sample rate, so it spends fastest: it gets 2 rounds.
    examples = {s.name: _examples(s, base, tmp_path / "cache") for s in sites}
    smallest = min(examples, key=lambda name: examples[name])
    budget = _budget_between_rounds(examples[smallest], base, 2)
    config = _config(
        "federation.rounds=4", "federation.min_sites=1", f"privacy.budget_epsilon={budget}"
    )
    summaries = Coordinator(_grid(sites, tmp_path), config, tmp_path / "run").run()
    for summary in summaries:
        for site, count in examples.items():
            allowed = _independent_epsilon(count, config, STEPS * summary.round) <= budget
            assert (site in summary.accepted) == allowed, (summary.round, site)
            if not allowed:
                assert site in summary.budget_spent
                assert "privacy budget spent" in summary.rejected[site][0]
        assert all(eps <= budget for eps in summary.epsilon.values())
    assert smallest in summaries[1].accepted and smallest in summaries[2].budget_spent
    # A site that sat out keeps its last (cumulative) epsilon in the record.
    assert summaries[3].epsilon[smallest] == summaries[1].epsilon[smallest]


def test_on_budget_exhausted_stop_ends_the_run_naming_the_site(
    sites: list[Path], tmp_path: Path
) -> None:
    base = _config("federation.rounds=3", "federation.min_sites=1")
    examples = {s.name: _examples(s, base, tmp_path / "cache") for s in sites}
    smallest = min(examples, key=lambda name: examples[name])
    budget = _budget_between_rounds(examples[smallest], base, 1)
    config = _config(
        "federation.rounds=3",
        "federation.min_sites=1",
        f"privacy.budget_epsilon={budget}",
        "privacy.on_budget_exhausted=stop",
    )
    with pytest.raises(CoordinatorStoppedError, match=rf"round 2: .*{smallest}.*spent its privacy"):
        Coordinator(_grid(sites, tmp_path), config, tmp_path / "run").run()


@pytest.mark.parametrize("level", LEVELS)
def test_a_private_local_run_logs_epsilon_per_epoch_and_resumes_its_accountant(
    sites: list[Path], tmp_path: Path, level: str
) -> None:
    """The local-only baseline under DP: per-epoch epsilon, checkpoint record, exact resume."""
    overrides = (
        "privacy.enabled=true",
        f"privacy.level={level}",
        f"privacy.batch_size={PATIENT_BATCH if level == 'patient' else 4}",
        f"privacy.noise_multiplier={SIGMA}",
        "privacy.accountant=rdp",
        f"output_dir={tmp_path}",
        "training.decay_epochs=0",
    )
    config = tiny_config(*overrides, "name=whole", "training.epochs=3")
    run = train_local([sites[0]], config, evaluate=False)
    count = _examples(sites[0], config, tmp_path / "cache")
    per_epoch = max(1, int(1 / _rate(count, config)))  # Poisson batches per epoch
    lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["steps"] for line in lines] == [per_epoch] * 3
    for epoch, line in enumerate(lines, start=1):
        expected = _independent_epsilon(count, config, per_epoch * epoch)
        assert line["epsilon"] == pytest.approx(expected, rel=1e-9)
    meta = json.loads((run.checkpoint / "checkpoint.json").read_text())
    assert meta["privacy"]["epsilon"] == pytest.approx(lines[-1]["epsilon"])
    assert meta["privacy"]["steps"] == 3 * per_epoch
    assert meta["privacy"]["level"] == level
    if level == "patient":  # the accountant's figure is the patient's
        assert meta["privacy"]["patients"] == count
        assert meta["privacy"]["patient_epsilon"] == meta["privacy"]["epsilon"]
    else:
        assert meta["privacy"]["patient_epsilon"] > meta["privacy"]["epsilon"]
    Synthesizer(run.checkpoint, device="cpu")  # a DP checkpoint loads into a plain generator

    # Two epochs, then a resumed third: the same epsilon as the uninterrupted run.
    train_local(
        [sites[0]], tiny_config(*overrides, "name=split", "training.epochs=2"), evaluate=False
    )
    resumed = train_local(
        [sites[0]],
        tiny_config(*overrides, "name=split", "training.epochs=3"),
        resume=True,
        evaluate=False,
    )
    last = json.loads((resumed.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epsilon"] == pytest.approx(lines[-1]["epsilon"], abs=1e-6)


def test_a_local_run_stops_at_the_epoch_that_would_pass_the_budget(
    sites: list[Path], tmp_path: Path
) -> None:
    probe = _config()
    count = _examples(sites[0], probe, tmp_path / "cache")
    per_epoch = max(1, int(1 / _rate(count, probe)))
    low = _independent_epsilon(count, probe, 2 * per_epoch)
    high = _independent_epsilon(count, probe, 3 * per_epoch)
    config = tiny_config(
        "privacy.enabled=true",
        f"privacy.batch_size={PATIENT_BATCH}",
        f"privacy.noise_multiplier={SIGMA}",
        "privacy.accountant=rdp",
        f"privacy.budget_epsilon={(low + high) / 2}",
        f"output_dir={tmp_path}",
        "training.epochs=5",
        "training.decay_epochs=0",
    )
    run = train_local([sites[0]], config, evaluate=False)
    assert len(run.history) == 2
    assert run.history[-1]["epsilon"] == pytest.approx(low, rel=1e-9)


# ---------------------------------------------------------------------------------- site level


def test_private_training_replies_carry_no_losses(sites: list[Path], tmp_path: Path) -> None:
    """... and the sites train at privacy.lr, not training.lr."""
    config = _config("federation.rounds=1", "federation.min_sites=3", "privacy.lr=3e-4")
    assert config.training.lr != 3e-4
    grid = _grid(sites, tmp_path)
    Coordinator(grid, config, tmp_path / "run").run()
    factor = config.federation.round_lr_factor(1, config.training)
    for _, reply in grid.replies:
        metrics = reply.content.metric_records[METRICS]
        keys = set(metrics)
        assert not any(k.startswith("loss_") for k in keys), keys
        assert {"epsilon", "delta", "num-examples"} <= keys
        if reply.metadata.message_type == "train":
            assert float(metrics["lr"]) == pytest.approx(3e-4 * factor)


def test_site_level_dp_clips_at_the_site_and_noises_the_unweighted_mean(
    sites: list[Path], tmp_path: Path
) -> None:
    clip, sigma = 0.02, 0.8
    config = tiny_config(
        "privacy.enabled=true",
        "privacy.level=site",
        f"privacy.noise_multiplier={sigma}",
        f"privacy.site_clip_norm={clip}",
        "privacy.accountant=rdp",
        f"federation.local_steps={STEPS}",
        "federation.rounds=2",
        "federation.min_sites=3",
        "federation.evaluate_sites=false",
    )
    grid = _grid(sites, tmp_path)
    coordinator = Coordinator(grid, config, tmp_path / "run")
    summaries = coordinator.run()
    sent = [r for _, r in grid.replies if r.metadata.message_type == "train"]
    assert len(sent) == 6
    for reply in sent:
        arrays = reply.content.array_records[ARRAYS]
        norm = math.sqrt(
            sum(float((a.numpy().astype(np.float64) ** 2).sum()) for a in arrays.values())
        )
        assert norm <= clip * (1 + 1e-5)
        assert norm > 0.5 * clip  # a real update is far larger: the clip was active

    # Round 2's global model = round 1's + unweighted mean of the three updates + noise whose
    # spread is sigma * clip / 3 (independent check on ~all coordinates).
    first = load_file(str(round_dir(tmp_path / "run", 1) / "generators.safetensors"))
    second = load_file(str(round_dir(tmp_path / "run", 2) / "generators.safetensors"))
    # The replies are packed numbers in the order of the coordinator's round-2 message.
    message = next(m for m in grid.sent if m.metadata.group_id == "train-2")
    sent_state = from_record(message.content.array_records[ARRAYS], "float32")
    round2 = [from_record(r.content.array_records[ARRAYS], "float32", sent_state) for r in sent[3:]]
    residuals = []
    assert set(sent_state) == set(first)  # both generators, the same flat names as on disk
    for key in first:
        mean = sum(r[key].numpy().astype(np.float64) for r in round2)
        residuals.append((second[key].astype(np.float64) - first[key] - mean / 3).ravel())
    noise = np.concatenate(residuals)
    assert noise.size > 1000
    assert abs(noise.std() / (sigma * clip / 3) - 1) < 0.05
    assert abs(noise.mean()) < 4 * sigma * clip / 3 / math.sqrt(noise.size)

    # One Gaussian mechanism per round with q = 1, recomputed with Opacus' functions.
    for summary in summaries:
        rdp = rdp_analysis.compute_rdp(
            q=1.0, noise_multiplier=sigma, steps=summary.round, orders=RDP_ORDERS
        )
        expected, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=1e-5)
        assert set(summary.epsilon) == {s.name for s in sites}
        assert all(e == pytest.approx(expected, rel=1e-9) for e in summary.epsilon.values())


def test_site_level_dp_refuses_rules_that_are_not_a_mean() -> None:
    with pytest.raises(ValueError, match="not a mean"):
        tiny_config(
            "privacy.enabled=true",
            "privacy.level=site",
            "privacy.noise_multiplier=1",
            "federation.strategy=fedmedian",
        )


def test_site_level_noise_is_resumed_exactly() -> None:
    import torch

    from fedsynth.server.strategy import Aggregator, SiteLevelDP, SiteUpdate

    base = {"w": torch.zeros(50)}
    updates = [
        SiteUpdate(f"s{i}", {"w": torch.full((50,), 0.01 * i)}, 10 * i + 1) for i in range(3)
    ]
    straight = SiteLevelDP(
        Aggregator(), noise_multiplier=1.0, clip_norm=1.0, mechanism="rdp", delta=1e-5
    )
    a = straight.aggregate(base, updates)
    saved = straight.state_dict()
    b = straight.aggregate(a, updates)
    resumed = SiteLevelDP(
        Aggregator(), noise_multiplier=1.0, clip_norm=1.0, mechanism="rdp", delta=1e-5
    )
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.aggregate(a, updates)["w"], b["w"])
    assert resumed.epsilon() == straight.epsilon()
    # Unweighted: weights 1, 11, 21 examples do not matter (noise aside, checked with sigma 0).
    exact = SiteLevelDP(
        Aggregator(), noise_multiplier=0.0, clip_norm=1.0, mechanism="rdp", delta=1e-5
    )
    torch.testing.assert_close(exact.aggregate(base, updates)["w"], torch.full((50,), 0.01))


def test_a_hospital_enforces_its_own_cap_whatever_the_coordinator_asks(
    sites: list[Path], tmp_path: Path
) -> None:
    """``fedsynth client --max-epsilon``: no DP, no training; with DP, never past the cap."""
    examples = _examples(sites[0], _config(), tmp_path / "cache")
    cap = _budget_between_rounds(examples, _config(), 1)
    nodes = {
        i: {"data-dir": str(site), "state-dir": str(tmp_path / f"state-{i}")}
        for i, site in enumerate(sites, start=1)
    }
    nodes[1]["max-epsilon"] = str(cap)
    names = {i: s.name for i, s in enumerate(sites, start=1)}

    plain = tiny_config("federation.rounds=1", "federation.min_sites=2", "federation.local_steps=1")
    summary = Coordinator(InProcessGrid(nodes, names=names), plain, tmp_path / "plain").run()[0]
    assert summary.budget_spent == ["site-1"]
    assert "trains only under DP-SGD at the site" in summary.rejected["site-1"][0]

    private = _config("federation.rounds=3", "federation.min_sites=2")  # no budget of its own
    summaries = Coordinator(InProcessGrid(nodes, names=names), private, tmp_path / "dp").run()
    assert "site-1" in summaries[0].accepted
    assert summaries[1].budget_spent == summaries[2].budget_spent == ["site-1"]
    assert summaries[2].epsilon["site-1"] <= cap
    assert summaries[2].epsilon["site-2"] > summaries[0].epsilon["site-2"]  # others go on
