"""The Flower app's run-config keys: declared once, read nowhere else."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedsynth.common.flower_processes import RUN_CONFIG, write_app_dir

ROOT = Path(__file__).resolve().parents[2]
# How the apps read a run-config key: run_config.get("key"), run_config["key"] or, in
# fedsynth.client.site_round, text("key", run_config).
READS = re.compile(
    r"""run_config(?:\.get\(|\[)\s*["']([a-z][a-z-]*)["']|text\(\s*["']([a-z][a-z-]*)["'],\s*run_config"""
)


def _read_keys() -> set[str]:
    found: set[str] = set()
    for package in ("client", "server", "common", "simulations"):
        for source in (ROOT / package).rglob("*.py"):
            for match in READS.finditer(source.read_text(encoding="utf-8")):
                found.add(match.group(1) or match.group(2))
    return found


def test_the_projects_pyproject_declares_every_key_the_apps_read() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = project["tool"]["flwr"]["app"]["config"]
    assert declared == RUN_CONFIG
    read = _read_keys()
    assert {"config-path", "site-dirs", "cpus-per-site", "admitted-keys"} <= read  # the scan works
    assert read <= set(declared), f"read but not declared: {sorted(read - set(declared))}"


def test_the_submitted_app_declares_the_same_table(tmp_path: Path) -> None:
    folder = write_app_dir(tmp_path / "app")
    written = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    assert written["tool"]["flwr"]["app"]["config"] == RUN_CONFIG
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert (
        written["tool"]["flwr"]["app"]["components"] == project["tool"]["flwr"]["app"]["components"]
    )


def test_waiting_for_a_run_reads_its_status_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `flwr ls` process per poll: the status comes from one in-process Control API client."""
    import subprocess

    from fedsynth.common import flower_processes

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    answers = iter(["starting", "running", "running", "finished:completed"])

    class Reader:
        asked = 0

        def status(self, run_id: int) -> str:
            assert run_id == 7
            Reader.asked += 1
            return next(answers)

    status = flower_processes.wait_run(7, Reader(), timeout=5.0, poll=0.0)  # type: ignore[arg-type]
    assert status == "finished:completed" and Reader.asked == 4
    with pytest.raises(flower_processes.FlowerError, match="not finished"):
        flower_processes.wait_run(7, Reader(), timeout=0.0)  # type: ignore[arg-type]
