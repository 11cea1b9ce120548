"""``status.json``, ``fedsynth status`` and a coordinator stopping on a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsynth.cli.main import app
from fedsynth.common.config import write_resolved_config
from fedsynth.server.coordinator import Coordinator, CoordinatorInterruptedError
from fedsynth.server.round_store import latest_round
from fedsynth.server.status import STATUS_FILE, STOPPED_FILE, StatusWriter, read_status
from fedsynth.simulations.engines.inprocess import InProcessGrid, tiny_config


def _grid(sites: list[Path], tmp: Path, faults: dict[str, str] | None = None) -> InProcessGrid:
    nodes = {}
    for index, site in enumerate(sites, start=1):
        nodes[index] = {"data-dir": str(site), "state-dir": str(tmp / f"state-{index}")}
        if faults and site.name in faults:
            nodes[index]["fault"] = faults[site.name]
    return InProcessGrid(nodes, names={i: s.name for i, s in enumerate(sites, start=1)})


def test_status_of_a_finished_run_with_refused_updates(sites: list[Path], tmp_path: Path) -> None:
    config = tiny_config(
        "federation.rounds=2", "federation.min_sites=1", "federation.evaluate_sites=false",
        "federation.local_steps=1",
    )  # fmt: skip
    run = tmp_path / "run"
    Coordinator(_grid(sites, tmp_path, {"site-2": "nan"}), config, run).run()

    status = read_status(run)
    live = json.loads((run / STATUS_FILE).read_text())
    assert live["state"] == "finished" and live["pid"] == os.getpid()
    assert (status.state, status.completed, status.rounds) == ("finished", 2, 2)
    by_name = {s.name: s for s in status.sites}
    assert set(by_name) == {"site-1", "site-2", "site-3"}
    assert (by_name["site-1"].rounds_accepted, by_name["site-1"].last_accepted) == (2, 2)
    assert (by_name["site-2"].rounds_accepted, by_name["site-2"].rejections) == (0, 2)
    assert "NaN" in str(by_name["site-2"].last_rejection)
    assert [(r.round, r.site) for r in status.rejected] == [(1, "site-2"), (2, "site-2")]
    # Independent of the reader: the round times as rounds.jsonl holds them.
    lines = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    seconds = sorted(line["seconds"] for line in lines)
    assert status.round_seconds == [line["seconds"] for line in lines]
    assert status.median_round_seconds == pytest.approx((seconds[0] + seconds[1]) / 2)
    assert by_name["site-1"].train["loss_g"] == lines[1]["train_metrics"]["site-1"]["loss_g"]
    assert status.remaining_seconds is None  # finished: nothing left

    result = CliRunner().invoke(app, ["status", "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["completed"] == 2
    table = CliRunner().invoke(app, ["status", "--run", str(run)])
    assert "state: finished" in table.output and "site-2" in table.output

    # A STOPPED file (the coordinator's reason to give up) wins over an old live state.
    (run / STOPPED_FILE).write_text("round 3: 0 valid update(s)\n")
    stopped = read_status(run)
    assert (stopped.state, stopped.detail) == ("stopped", "round 3: 0 valid update(s)")


def test_a_signal_while_a_round_is_written_waits_for_the_round(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config(
        "federation.rounds=3", "federation.min_sites=3", "federation.evaluate_sites=false",
        "federation.local_steps=1",
    )  # fmt: skip
    run = tmp_path / "run"
    coordinator = Coordinator(_grid(sites, tmp_path), config, run)
    write_round = coordinator._write_round

    def signalled_mid_write(summary):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)  # docker stop, in the middle of the checkpoint
        write_round(summary)

    coordinator._write_round = signalled_mid_write  # type: ignore[method-assign]
    with pytest.raises(CoordinatorInterruptedError) as caught, coordinator.stop_on_signals():
        coordinator.run()
    # The round being written when the signal came was finished; none after it started.
    assert latest_round(run) == 1
    assert len((run / "rounds.jsonl").read_text().splitlines()) == 1
    assert not list(run.rglob(".*.tmp*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    text = coordinator.interrupted(caught.value)
    assert "(SIGTERM)" in text and "--resume continues after round 1" in text
    status = read_status(run)
    assert (status.state, status.completed) == ("interrupted", 1)
    assert status.remaining_seconds is None


def test_a_coordinator_that_died_reads_as_interrupted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_resolved_config(tiny_config("federation.rounds=4"), run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    writer = StatusWriter(run, rounds=4)
    writer.set("training", 2, "1 of 3 sites replied", online=["a", "b", "c"], waiting_for=["c"])
    live = json.loads((run / STATUS_FILE).read_text())
    assert live["waiting_for"] == ["c"] and live["round"] == 2
    alive = read_status(run)
    assert alive.running is True  # this process wrote it and is alive
    assert (alive.online, alive.waiting_for) == (["a", "b", "c"], ["c"])
    shown = CliRunner().invoke(app, ["status", "--run", str(run)])
    assert "waiting for: c" in shown.output and "online: a, b, c" in shown.output
    live["pid"] = int(dead.stdout)
    (run / STATUS_FILE).write_text(json.dumps(live))
    status = read_status(run)
    assert status.state == "interrupted" and status.running is False
    assert status.waiting_for == []  # nobody is waited for by a dead coordinator
    assert "training in round 2" in status.detail


def test_status_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert "config.resolved.toml" in result.output


def test_a_broken_rounds_log_line_is_reported_not_fatal(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_resolved_config(tiny_config("federation.rounds=4"), run)
    good = {"round": 1, "seconds": 3.0, "sites": ["a"], "train_metrics": {"a": {"loss_g": 1.0}}}
    (run / "rounds.jsonl").write_text(json.dumps(good) + "\n" + '{"round": 2, "sec')
    status = read_status(run)
    assert status.round_seconds == [3.0]
    assert "line 2" in status.notes[0]


def test_status_names_the_best_round_the_sites_validation_chose(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config(
        "federation.rounds=1", "federation.min_sites=1", "federation.local_steps=1"
    )
    run = tmp_path / "run"
    Coordinator(_grid(sites, tmp_path), config, run).run()
    best = json.loads((run / "best.json").read_text())
    table = CliRunner().invoke(app, ["status", "--run", str(run)])
    assert table.exit_code == 0, table.output
    assert f"best round {best['round']} ({best['score']:.2f} dB on" in table.output
