"""The hospital daemon's warm ClientApp worker: the ClientApp's code is imported once per daemon.

Flower's SuperNode, in its default ``subprocess`` isolation, starts a SuperExec that launches a
fresh ``flwr-clientapp`` process for every message, and each one imports torch, fedsynth (and,
under DP, Opacus) again: seconds of CPU per message and site. ``fedsynth client`` instead runs
the SuperNode with ``--isolation process`` and this worker as its SuperExec:

1. it imports :mod:`fedsynth.client.app` (the ClientApp, torch, numpy, fedsynth) once, starting
   no thread and never touching CUDA;
2. it runs Flower's own SuperExec loop, which acquires ClientApp tasks from the SuperNode's
   runtime API on loopback;
3. for each task it forks one child, which runs Flower's own per-task entry point (what
   ``flwr-clientapp`` runs) with the task's token, and exits.

Forking keeps Flower's semantics: each message still is a process of its own, so ``flwr stop``
and heartbeat interruption end it as before, a crash or an out-of-memory kill ends one message
and not the worker, nothing a message leaves in memory (GPU memory included) reaches the next
one, and the child inherits only the imports. Tasks that are not ClientApps go to Flower's
subprocess executor, as in the default mode.

Flower internals used, pinned with ``flwr==1.42.*`` in pyproject.toml (checked there):
``flwr.supercore.superexec.run_superexec`` (``run_superexec`` and its module-level
``get_executor``, which this worker replaces for its own process), the executor interface of
``flwr.supercore.superexec.executor`` (``ExecutionSpec``, ``LaunchResult``,
``SubprocessExecutor``), ``flwr.supercore.constant.TaskType`` and
``flwr.supernode.runtime.run_clientapp.run_clientapp``; and, for the object retries every child
inherits, those of :mod:`fedsynth.common.flower_waits`.

Run by ``fedsynth client`` (:func:`fedsynth.client.daemon.run_supernode`)::

    python -m fedsynth.client.worker --runtime-api-address 127.0.0.1:9094 \
        --parent-pid <SuperNode pid>
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger("fedsynth.client")

# Set in the worker's environment by the daemon, before numpy loads: OpenBLAS (numpy's and
# SciPy's) would otherwise start its thread pool at import, and a process should not fork with
# threads running. The ClientApp's heavy arithmetic is torch's, which sets its own threads.
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL is Flower's own setting: how often its SuperExec loop asks the
# SuperNode for a task (1 s by default); a question on loopback costs next to nothing.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def thread_count() -> int:
    """Threads of this process, native ones included (Linux; 1 elsewhere)."""
    try:
        return sum(1 for _ in Path("/proc/self/task").iterdir())
    except OSError:
        return 1


class ForkExecutor:
    """A SuperExec executor that runs each ClientApp task in a child forked from this process.

    Implements the interface of Flower's executors (``get_eligible_capacity``,
    ``wait_for_capacity``, ``launch``, ``reconcile``, ``close``).
    """

    def __init__(self, parent_pid: int | None = None):
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.parent_pid = parent_pid
        self.children: dict[int, int] = {}  # pid -> task id
        self.launched = 0
        self._fallback = SubprocessExecutor()

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **kwargs: Any
    ) -> tuple[set[Any], set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        threads = thread_count()
        if threads != 1:  # a fork would copy locks held by threads that do not come along
            logger.warning("warm worker: %d threads at fork time (expected 1)", threads)
        pid = os.fork()
        if pid == 0:  # the child: one message, then exit without the parent's cleanup
            os._exit(_run_task(spec))
        self.children[pid] = int(spec.task_id)
        self.launched += 1
        logger.info(
            "warm worker %d: message %d (task %s) in process %d",
            os.getpid(),
            self.launched,
            spec.task_id,
            pid,
        )
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children; leave when the SuperNode is gone (called every poll)."""
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                if os.WIFSIGNALED(status):
                    logger.warning(
                        "ClientApp task %s ended by signal %d",
                        self.children[pid],
                        os.WTERMSIG(status),
                    )
            self.children.pop(pid, None)
        if self.parent_pid is not None and not _alive(self.parent_pid):
            logger.info("warm worker: the SuperNode (pid %d) is gone; stopping", self.parent_pid)
            raise SystemExit(0)  # Flower's loop closes this executor on the way out

    def close(self) -> None:
        """Stop the children still running (the SuperNode is stopping)."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.pop(pid, None)
            time.sleep(0.1)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.children.clear()
        self._fallback.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _run_task(spec: Any) -> int:
    """In the forked child: Flower's per-task ClientApp entry point; the exit code."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # A fresh ClientApp process as far as logging goes: the ClientApp sets up its own handlers
        # (fedsynth.client.app.setup_site_logging), and the worker's would print each line again.
        logging.getLogger().handlers.clear()
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def serve(runtime_api_address: str, parent_pid: int | None) -> None:
    """Import the ClientApp, then run Flower's SuperExec loop with :class:`ForkExecutor`."""
    import torch

    import fedsynth.client.app  # noqa: F401  (the one import of the ClientApp's code, for every message)

    if torch.cuda.is_initialized():  # pragma: no cover (a bug: the children could not use it)
        raise RuntimeError("the warm worker initialised CUDA before forking")
    from flwr.supercore.superexec import run_superexec as superexec

    from fedsynth.common.flower_waits import quick_object_pulls

    quick_object_pulls()  # inherited by every child (fedsynth.common.flower_waits)
    executor = ForkExecutor(parent_pid)
    # Flower's loop builds its executor through this module-level name: this process uses ours.
    superexec.get_executor = lambda *args, **kwargs: executor
    logger.info(
        "warm ClientApp worker ready (pid %d, %d thread(s)); serving %s",
        os.getpid(),
        thread_count(),
        runtime_api_address,
    )
    # No parent_pid for Flower: its monitor is a thread, and this process must fork without
    # threads; reconcile() watches the SuperNode instead, on every poll.
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    host = args.runtime_api_address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the worker talks to its SuperNode on loopback only")
    # Warnings from every library, fedsynth's own lines from INFO up (httpx would log each
    # poll of the SuperNode, once a second).
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s fedsynth: %(message)s"
    )
    logger.setLevel(logging.INFO)
    serve(args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":
    main()
