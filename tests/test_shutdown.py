"""SIGTERM, as ``docker stop`` and systemd send it, to a hospital daemon and a coordinator that are
in the middle of a round: both exit promptly, leave no process behind and no half-written file,
and the coordinator's run folder says where it stood and how to go on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.flower import free_port
from server.status import STATUS_FILE, read_status
from simulations.inprocess import TINY, phantom_sites

pytestmark = pytest.mark.slow

FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; it is gone for every purpose that matters here.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _processes_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (the SuperNode's helpers name its port)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(int(cmdline.parent.name))
    return found


def _wait(predicate, timeout: float, what: str, logs: list[Path]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = {p.name: p.read_text(errors="replace")[-2000:] for p in logs if p.exists()}
    pytest.fail(f"timed out waiting for {what}:\n{json.dumps(tails, indent=1)}")


def test_sigterm_mid_round_stops_hospital_and_coordinator_cleanly(tmp_path: Path) -> None:
    site = phantom_sites(tmp_path / "data", (1,))[0]
    port = free_port()
    config = tmp_path / "consortium.toml"
    lines = ['preset = "cpu-small"', "[federation]", "rounds = 3", "min_sites = 1"]
    lines += ["evaluate_sites = false", "[data]"]
    lines += [f"{item.split('=', 1)[0].split('.', 1)[1]} = {item.split('=', 1)[1]}"
              for item in TINY if item.startswith("data.")]  # fmt: skip
    # A round long enough to be interrupted in the middle of it.
    lines += ["[training]", "batch_size = 1"]
    config.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    run = tmp_path / "run"
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("ab")
        procs[name] = subprocess.Popen(
            [FEDSYNTH, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        return procs[name]

    logs = [tmp_path / "server.log", tmp_path / "hospital.log", run / "coordinator.log"]
    try:
        server = start("server", ["server", "--run-dir", str(run), "--insecure", "--host",
                                  "127.0.0.1", "--port", str(port), "--config",
                                  str(config)])  # fmt: skip
        _wait(lambda: (run / STATUS_FILE).exists(), 120, "the coordinator", logs)
        runtime_port = free_port()
        hospital = start("hospital", ["client", "--data-dir", str(site), "--superlink",
                                      f"127.0.0.1:{port}", "--insecure", "--state-dir",
                                      str(tmp_path / "state"), "--runtime-port",
                                      str(runtime_port)])  # fmt: skip
        _wait(lambda: read_status(run).state == "training", 120, "round 1 to start", logs)
        time.sleep(3.0)  # the hospital is now loading data or training

        # The coordinator first, while it waits for the hospital's reply to round 1.
        live = json.loads((run / STATUS_FILE).read_text())
        assert live["state"] == "training" and live["round"] == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 128 + signal.SIGTERM
        _wait(lambda: not _pid_alive(live["pid"]), 30, "the ServerApp process", logs)
        assert not _group_alive(server.pid)
        assert not (run / "superlink.pid").exists()
        text = (tmp_path / "server.log").read_text()
        assert "stopped by SIGTERM" in text
        assert f"fedsynth server --run-dir {run} --insecure --resume" in text

        # Then the hospital, mid-round: SIGTERM to the daemon's own process, as `docker stop`.
        helpers = _processes_mentioning(f":{runtime_port}")
        assert len(helpers) >= 2  # the SuperNode's SuperExec and the round's ClientApp, at least
        hospital.send_signal(signal.SIGTERM)
        assert hospital.wait(30) == 128 + signal.SIGTERM
        assert not _group_alive(hospital.pid)
        # Its SuperExec and ClientApp (in sessions of their own) were waited for, not orphaned.
        assert not [p for p in helpers if _pid_alive(p)]
        assert not list((tmp_path / "state").rglob(".*.tmp*")), "half-written state left"
        assert "stopping the SuperNode" in (tmp_path / "hospital.log").read_text()
        status = read_status(run)
        assert status.state == "interrupted" and status.running is False
        assert "round 1" in status.detail
        assert "no round is complete yet" in (run / "coordinator.log").read_text()
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.killpg(int((run / "superlink.pid").read_text()), signal.SIGKILL)
