"""The warm ClientApp worker: one import, one forked child per message, no threads at fork."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsynth.client import worker
from fedsynth.client.worker import WORKER_ENV, ForkExecutor


@dataclass
class Spec:
    """What Flower's SuperExec hands an executor (the fields the worker reads)."""

    task_type: str
    task_id: int
    runtime_api_address: str = "127.0.0.1:9094"
    token: str = "t"
    insecure: bool = True
    root_certificates_path: str | None = None
    runtime_dependency_install: bool = False
    parent_pid: int | None = None
    suppress_output: bool = False
    fab_hash: str | None = None


def test_each_clientapp_task_runs_in_a_child_that_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.constant import TaskType

    def task(spec: Spec) -> int:  # in the child: what Flower's entry point would do
        (tmp_path / f"task-{spec.task_id}").write_text(f"{os.getpid()} {os.getppid()}")
        return 3 if spec.task_id == 2 else 0

    monkeypatch.setattr(worker, "_run_task", task)
    executor = ForkExecutor(parent_pid=os.getpid())
    for task_id in (1, 2):
        result = executor.launch(Spec(TaskType.CLIENT_APP, task_id))
        assert result.status.name == "ACCEPTED"
    assert executor.launched == 2 and len(executor.children) == 2
    deadline = time.monotonic() + 20
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children  # both reaped, no zombie left
    pids = []
    for task_id in (1, 2):
        child, parent = (int(v) for v in (tmp_path / f"task-{task_id}").read_text().split())
        assert parent == os.getpid() and child != os.getpid()
        pids.append(child)
    assert len(set(pids)) == 2  # one process per message


def test_other_task_types_go_to_flowers_own_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.constant import TaskType

    executor = ForkExecutor()
    seen = []
    monkeypatch.setattr(executor._fallback, "launch", lambda spec: seen.append(spec) or "ok")
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked for a non-ClientApp task"))
    assert executor.launch(Spec(TaskType.SERVER_APP, 9)) == "ok" and len(seen) == 1


def test_the_worker_stops_when_its_supernode_is_gone() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    executor = ForkExecutor(parent_pid=gone.pid)
    with pytest.raises(SystemExit):
        executor.reconcile()


def test_the_worker_forks_with_one_thread_and_without_cuda() -> None:
    """In the worker's environment, everything the ClientApp imports starts no thread (OpenBLAS
    would, without WORKER_ENV) and CUDA stays uninitialised: a fork copies only this thread."""
    probe = (
        "import fedsynth.client.app, torch\n"
        "from flwr.supercore.superexec import run_superexec\n"
        "from fedsynth.client.worker import thread_count\n"
        "print(thread_count(), torch.cuda.is_initialized())\n"
    )
    env = {**os.environ, **WORKER_ENV}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["1", "False"], done.stdout + done.stderr


def test_the_worker_talks_to_its_supernode_on_loopback_only() -> None:
    with pytest.raises(SystemExit):
        worker.main(["--runtime-api-address", "10.0.0.5:9094"])
