"""The coordinator's rounds against the real ClientApp, over an in-process transport double."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from safetensors.numpy import load_file

from fedsynth.common.messages import ARRAYS, METRICS, from_record
from fedsynth.common.synthesis import Synthesizer
from fedsynth.server.coordinator import Coordinator, CoordinatorStoppedError
from fedsynth.server.round_store import (
    BEST_NAME,
    best_checkpoint,
    best_round,
    latest_round,
    round_dir,
)
from fedsynth.server.status import read_status
from fedsynth.simulations.engines.inprocess import InProcessGrid, tiny_config


def _nodes(sites: list[Path], tmp: Path, **extra: dict[str, str]) -> dict[int, dict[str, str]]:
    nodes = {}
    for index, site in enumerate(sites, start=1):
        config = {"data-dir": str(site), "state-dir": str(tmp / f"state-{index}")}
        config.update(extra.get(site.name, {}))
        nodes[index] = config
    return nodes


def _names(sites: list[Path]) -> dict[int, str]:
    return {i: s.name for i, s in enumerate(sites, start=1)}


def test_round_is_the_example_weighted_mean_of_the_site_updates(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config("federation.rounds=1", "federation.min_sites=3")
    grid = InProcessGrid(_nodes(sites, tmp_path), names=_names(sites))
    coordinator = Coordinator(grid, config, tmp_path / "run")
    summary = coordinator.run()[0]

    assert summary.accepted == ["site-1", "site-2", "site-3"]
    assert not summary.rejected
    trained = [(n, r) for n, r in grid.replies if r.metadata.message_type == "train"]
    assert len(trained) == 3
    # Independent computation: numpy weighted mean of the replies' arrays.
    weights = {n: float(r.content.metric_records[METRICS]["num-examples"]) for n, r in trained}
    # Sites of 3, 2 and 1 subjects (unpaired split: 2+1, 1+1, 1+1 volumes): the largest site
    # trains on more examples and gets more weight.
    assert weights[1] > weights[2] >= weights[3] > 0
    total = sum(weights.values())
    saved = load_file(str(round_dir(tmp_path / "run", 1) / "generators.safetensors"))
    # The global model of round 1, and each site's update unpacked in its layout's order.
    sent = from_record(grid.sent[0].content.array_records[ARRAYS], "float32")
    updates = {n: from_record(r.content.array_records[ARRAYS], "float32", sent) for n, r in trained}
    some_keys = [k for k in sent if k.startswith("g_ab.")]
    assert len(some_keys) >= 5
    for key in some_keys[:5]:
        # Sites send updates (trained - received); the new global is old + weighted mean update.
        expected = sent[key].numpy().astype(np.float64) + sum(
            weights[n] / total * update[key].numpy().astype(np.float64)
            for n, update in updates.items()
        )
        np.testing.assert_allclose(saved[key], expected, rtol=1e-5, atol=1e-6)
    record = json.loads((round_dir(tmp_path / "run", 1) / "round.json").read_text())
    assert set(record["per_site"]) == {"site-1", "site-2", "site-3"}
    assert record["bytes_per_site"]["site-1"] == sum(
        a.numpy().nbytes for a in trained[0][1].content.array_records[ARRAYS].values()
    )
    assert latest_round(tmp_path / "run") == 1


def test_nan_and_misshapen_updates_are_left_out_and_logged(
    sites: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(
        "federation.rounds=1", "federation.min_sites=1", "federation.evaluate_sites=false"
    )
    nodes = _nodes(sites, tmp_path, **{"site-2": {"fault": "nan"}, "site-3": {"fault": "shape"}})
    grid = InProcessGrid(nodes, names=_names(sites))
    with caplog.at_level(logging.WARNING, logger="fedsynth.server"):
        summary = Coordinator(grid, config, tmp_path / "run").run()[0]
    assert summary.accepted == ["site-1"]
    assert "NaN" in " ".join(summary.rejected["site-2"])
    assert "shape" in " ".join(summary.rejected["site-3"])
    logged = caplog.text
    assert "left out site-2" in logged and "left out site-3" in logged
    saved = load_file(str(round_dir(tmp_path / "run", 1) / "generators.safetensors"))
    assert all(np.isfinite(v).all() for v in saved.values())


def test_too_few_valid_updates_stop_the_run_naming_the_sites(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config("federation.rounds=2", "federation.min_sites=3")
    nodes = _nodes(sites, tmp_path, **{"site-2": {"fault": "nan"}})
    grid = InProcessGrid(nodes, names=_names(sites))
    with pytest.raises(CoordinatorStoppedError, match=r"round 1: 2 valid update.*site-2 \("):
        Coordinator(grid, config, tmp_path / "run").run()
    assert latest_round(tmp_path / "run") is None  # nothing half-written counts as a round


def test_a_silent_site_times_out_and_the_round_goes_on(sites: list[Path], tmp_path: Path) -> None:
    config = tiny_config(
        "federation.rounds=1",
        "federation.min_sites=2",
        "federation.round_timeout_s=1.5",
        "federation.evaluate_sites=false",
    )
    grid = InProcessGrid(_nodes(sites, tmp_path), names=_names(sites), silent=[3])
    summary = Coordinator(grid, config, tmp_path / "run").run()[0]
    assert summary.accepted == ["site-1", "site-2"]
    assert "no reply within" in summary.rejected["site-3"][0]


def test_a_site_without_the_target_modality_declines_without_leaking_paths(
    sites: list[Path], tmp_path: Path
) -> None:
    t1_only = tmp_path / "t1-only"
    for scan in sites[0].rglob("*_T1w.nii.gz"):
        if "derivatives" in scan.parts:
            continue
        target = t1_only / scan.relative_to(sites[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(scan.read_bytes())
    config = tiny_config("federation.rounds=1", "federation.min_sites=2")
    nodes = _nodes(sites[:2], tmp_path)
    nodes[9] = {"data-dir": str(t1_only), "state-dir": str(tmp_path / "state-9")}
    grid = InProcessGrid(nodes, names={**_names(sites[:2]), 9: "t1-only"})
    summary = Coordinator(grid, config, tmp_path / "run").run()[0]
    reason = summary.rejected["t1-only"][0]
    prefix = "site error 100: no usable scans for T1w->T2w"
    assert reason.startswith(prefix)
    assert "/" not in reason.removeprefix(prefix)
    assert "sub-" not in reason and str(tmp_path) not in reason


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_interrupted_then_resumed_run_ends_with_the_same_generators(
    sites: list[Path], tmp_path: Path, strategy: str
) -> None:
    settings = (
        "federation.rounds=3",
        "federation.min_sites=3",
        "federation.evaluate_sites=false",
        f"federation.strategy={strategy}",
        "federation.server_lr=0.05",
    )
    config = tiny_config(*settings)

    straight = tmp_path / "straight"
    Coordinator(InProcessGrid(_nodes(sites, straight), names=_names(sites)), config, straight).run()

    broken = tmp_path / "broken"
    grid = InProcessGrid(_nodes(sites, broken), names=_names(sites), crash_on="train-3")
    with pytest.raises(KeyboardInterrupt):
        Coordinator(grid, config, broken).run()
    assert latest_round(broken) == 2
    # The sites did train round 3 before the crash: resuming must not start from that state.
    assert len(list(broken.glob("state-*/*/state-round-0003.pt"))) == 3
    with pytest.raises(CoordinatorStoppedError, match="--resume"):
        Coordinator(InProcessGrid(_nodes(sites, broken)), config, broken)
    resumed = Coordinator(
        InProcessGrid(_nodes(sites, broken), names=_names(sites)), config, broken, resume=True
    )
    assert resumed.start_round == 3
    resumed.run()

    a = load_file(str(round_dir(straight, 3) / "generators.safetensors"))
    b = load_file(str(round_dir(broken, 3) / "generators.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # ... and the run really trained: round 3 differs from round 2.
    before = load_file(str(round_dir(straight, 2) / "generators.safetensors"))
    assert any(not np.array_equal(a[k], before[k]) for k in a)


def test_only_nodes_with_an_admitted_key_take_part_under_the_admitted_name(
    sites: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pair() -> tuple[bytes, str]:  # (PEM as the SuperLink reports it, OpenSSH as admitted)
        public = ec.generate_private_key(ec.SECP384R1()).public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ssh = public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return pem, ssh.decode()

    a, b, outsider = pair(), pair(), pair()
    config = tiny_config(
        "federation.rounds=1", "federation.min_sites=2", "federation.evaluate_sites=false",
        "federation.local_steps=1",
    )  # fmt: skip
    # Node 3 registered its own key through the Control API and calls itself "hospital-a".
    grid = InProcessGrid(
        _nodes(sites, tmp_path),
        names={1: "hospital-a", 2: "b-renamed", 3: "hospital-a"},
        keys={1: a[0], 2: b[0], 3: outsider[0]},
    )
    admitted = {"hospital-a": a[1], "hospital-b": b[1]}
    with caplog.at_level(logging.WARNING, logger="fedsynth.server"):
        summary = Coordinator(grid, config, tmp_path / "run", admitted=admitted).run()[0]
    assert summary.sites == ["hospital-a", "hospital-b"]  # named by key, not by registration
    assert summary.accepted == ["hospital-a", "hospital-b"]
    assert all(m.metadata.dst_node_id != 3 for m in grid.sent)  # never sent anything
    assert "ignoring node 3 (registered as 'hospital-a')" in caplog.text
    assert caplog.text.count("ignoring node 3") == 1  # logged once, not every poll


# ------------------------------------------------------------------ best round and EMA

# The sites' validation PSNR per round, imposed on their real replies: the example-weighted mean
# peaks at round 1 (site-1 holds most validation slices), the unweighted one at round 2, and the
# last round is neither.
IMPOSED = {
    1: {"site-1": 20.0, "site-2": 14.0, "site-3": 8.0},
    2: {"site-1": 13.0, "site-2": 14.0, "site-3": 22.0},
    3: {"site-1": 15.0, "site-2": 15.0, "site-3": 15.0},
}


class ScoredGrid(InProcessGrid):
    """The in-process transport, with the evaluation replies' masked PSNR set from a table."""

    def __init__(self, *args: Any, scores: dict[int, dict[str, float]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scores = scores

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        before = len(self.replies)
        ids = super().push_messages(messages)
        for message, (node, reply) in zip(messages, self.replies[before:], strict=False):
            kind, _, number = message.metadata.group_id.partition("-")
            if kind == "evaluate" and not reply.has_error():
                value = self.scores[int(number)][self.names[node]]
                reply.content.metric_records[METRICS]["psnr_masked"] = value
        return ids


def _validation_scores(grid: InProcessGrid) -> dict[int, dict[str, tuple[float, float]]]:
    """Per round, per site (psnr_masked, num-examples) as the sites replied to "evaluate"."""
    scores: dict[int, dict[str, tuple[float, float]]] = {}
    for sent, (node, reply) in zip(grid.sent, grid.replies, strict=True):
        assert sent.metadata.dst_node_id == node
        kind, _, number = sent.metadata.group_id.partition("-")
        if kind != "evaluate" or reply.has_error():
            continue
        metrics = reply.content.metric_records[METRICS]
        scores.setdefault(int(number), {})[grid.names[node]] = (
            float(metrics["psnr_masked"]),
            float(metrics["num-examples"]),
        )
    return scores


def _expected_best(scores: dict[int, dict[str, tuple[float, float]]]) -> tuple[int, float]:
    """The example-weighted mean of each round's site scores; the first round with the most."""
    means = {
        number: sum(p * n for p, n in sites.values()) / sum(n for _, n in sites.values())
        for number, sites in scores.items()
    }
    best = max(sorted(means), key=lambda number: (means[number], -number))
    return best, means[best]


WEIGHTS = "generators.safetensors"


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(folder / WEIGHTS)).items()}


def test_best_round_and_moving_average_are_kept_and_survive_a_resume(
    sites: list[Path], tmp_path: Path
) -> None:
    decay = 0.6
    config = tiny_config(
        "federation.rounds=3",
        "federation.min_sites=3",
        "federation.local_steps=2",
        f"federation.ema_decay={decay}",
    )
    straight = tmp_path / "straight"
    grid = ScoredGrid(_nodes(sites, straight), names=_names(sites), scores=IMPOSED)
    Coordinator(grid, config, straight).run()

    # best.json names the round whose example-weighted validation PSNR is highest.
    scores = _validation_scores(grid)
    assert sorted(scores) == [1, 2, 3] and all(len(s) == 3 for s in scores.values())
    examples = {site: n for site, (_, n) in scores[1].items()}
    expected_round, expected_score = _expected_best(scores)
    unweighted, _ = _expected_best(
        {r: {s: (p, 1.0) for s, (p, _) in v.items()} for r, v in scores.items()}
    )
    assert (expected_round, unweighted) == (1, 2)  # the table's premise, with the real weights
    best = json.loads((straight / BEST_NAME).read_text())
    assert best["round"] == expected_round == best_round(straight)
    assert best["score"] == pytest.approx(expected_score, rel=1e-9)
    assert best["metric"] == "eval/psnr_masked" and best["last_round"] == 3
    assert best["per_site"] == IMPOSED[1] and best["examples"] == examples
    folder = best_checkpoint(straight)
    assert folder == round_dir(straight, expected_round)
    assert (folder / "checkpoint.json").exists() and (folder / WEIGHTS).exists()
    assert best_checkpoint(straight, ema=True) == folder / "ema"
    Synthesizer(folder / "ema", device="cpu")  # the average loads as any checkpoint does
    status = read_status(straight)
    assert status.best_round == 1
    assert (
        status.best_line == f"best round 1 ({expected_score:.2f} dB on the sites' validation data)"
    )

    # The moving average equals an independent computation over the saved round weights.
    plain = {n: _weights(round_dir(straight, n)) for n in (1, 2, 3)}
    ema = {n: _weights(round_dir(straight, n) / "ema") for n in (1, 2, 3)}
    running = plain[1]
    for number in (1, 2, 3):
        if number > 1:
            running = {k: decay * running[k] + (1 - decay) * plain[number][k] for k in running}
        for key in running:
            np.testing.assert_allclose(ema[number][key], running[key], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(ema[3][k], plain[3][k]) for k in plain[3])
    # Sites train from the plain aggregate, never from the average.
    sent = next(m for m in grid.sent if m.metadata.group_id == "train-3")
    received = from_record(sent.content.array_records[ARRAYS], "float32")
    some = [k for k in plain[2] if not np.allclose(plain[2][k], ema[2][k])][:3]
    assert some
    for key in some:
        np.testing.assert_allclose(received[key].numpy(), plain[2][key], rtol=1e-6, atol=1e-7)

    # Interrupted during round 3, then resumed: the best so far and the average carry over.
    broken = tmp_path / "broken"
    grid = ScoredGrid(
        _nodes(sites, broken), names=_names(sites), scores=IMPOSED, crash_on="train-3"
    )
    with pytest.raises(KeyboardInterrupt):
        Coordinator(grid, config, broken).run()
    assert best_round(broken) == 1
    (broken / BEST_NAME).unlink()  # lost: recomputed from the rounds' records
    assert best_round(broken) == 1
    resumed = Coordinator(
        ScoredGrid(_nodes(sites, broken), names=_names(sites), scores=IMPOSED),
        config,
        broken,
        resume=True,
    )
    assert resumed.best is not None and resumed.best.round == 1
    resumed.run()
    again = json.loads((broken / BEST_NAME).read_text())
    assert (again["round"], again["last_round"]) == (1, 3)
    assert again["score"] == pytest.approx(expected_score, rel=1e-9)
    resumed_ema = _weights(round_dir(broken, 3) / "ema")
    for key in resumed_ema:
        np.testing.assert_allclose(resumed_ema[key], ema[3][key], rtol=1e-6, atol=1e-7)


def test_round_one_starts_from_the_given_generators_and_the_run_says_which(
    sites: list[Path], tmp_path: Path
) -> None:
    """``federation.initial_generators``: a train-local checkpoint (here of one phantom site; in
    practice public data) is what the sites receive in round 1, and run.json names it with its
    hash. A checkpoint of another model is refused before any round, naming the setting."""
    from fedsynth.client.local import train_local

    local = train_local(
        [sites[2]],
        tiny_config("training.epochs=2", "training.decay_epochs=0", f"output_dir={tmp_path}",
                    "name=warm"),
        evaluate=False,
    )  # fmt: skip
    config = tiny_config(
        "federation.rounds=1",
        "federation.min_sites=3",
        "federation.evaluate_sites=false",
        f"federation.initial_generators={local.checkpoint}",
    )
    grid = InProcessGrid(_nodes(sites, tmp_path), names=_names(sites))
    Coordinator(grid, config, tmp_path / "run").run()
    sent = from_record(grid.sent[0].content.array_records[ARRAYS], "float32")
    warm = load_file(str(local.checkpoint / "generators.safetensors"))
    assert set(sent) == set(warm)
    for key, value in warm.items():
        np.testing.assert_array_equal(sent[key].numpy(), value)
    untrained = Coordinator(
        InProcessGrid({}), tiny_config("federation.rounds=1"), tmp_path / "fresh"
    ).state
    assert any(not np.array_equal(untrained[k].numpy(), warm[k]) for k in warm)
    run = json.loads((tmp_path / "run" / "run.json").read_text())["initial_generators"]
    digest = hashlib.sha256((local.checkpoint / "generators.safetensors").read_bytes())
    assert run["sha256"] == digest.hexdigest()
    assert run["kind"] == "local" and run["epoch"] == 2 and run["sites"] == [sites[2].name]
    assert run["networks"] == ["g_ab", "g_ba"]

    other = tiny_config("model.ngf=4", f"federation.initial_generators={local.checkpoint}")
    with pytest.raises(CoordinatorStoppedError, match=r"initial_generators.*model settings differ"):
        Coordinator(InProcessGrid({}), other, tmp_path / "other")
    with pytest.raises(CoordinatorStoppedError, match="not a fedsynth checkpoint"):
        Coordinator(
            InProcessGrid({}),
            tiny_config(f"federation.initial_generators={tmp_path}"),
            tmp_path / "missing",
        )
