"""``fedsynth client``: a hospital's daemon, a Flower SuperNode running fedsynth's ClientApp.

The node config carries only what the hospital decides: its data folder, device and state
folder. Model, preprocessing and training settings come from the coordinator each round. Before
connecting, the data folder is checked with the same discovery as ``fedsynth inspect`` so that a
wrong path fails here, with the path, rather than as a refused round later.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsynth.client.worker import WORKER_ENV
from fedsynth.common.data.discovery import discover_site
from fedsynth.common.flower_processes import flower_env, node_config_text

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
# How long the SuperNode's helpers get to stop after it: inside Docker's default 10 s stop timeout.
STOP_GRACE_S = 8.0

INSECURE_WARNING = (
    "INSECURE: connecting without TLS or node authentication. The model and metrics travel in "
    "clear text and the coordinator cannot tell this node from an impostor. Tests only."
)


@dataclass(frozen=True)
class ClientOptions:
    data_dir: Path
    superlink: str
    state_dir: Path
    device: str | None = None
    root_certificates: Path | None = None
    private_key: Path | None = None
    insecure: bool = False
    audit_log: Path | None = None
    fault: str | None = None
    runtime_port: int = 9094
    max_epsilon: float | None = None
    skip_bad: bool = False
    warm_worker: bool = True  # False: Flower's own SuperExec, a fresh process per message


def supernode_command(options: ClientOptions) -> tuple[list[str], dict[str, str]]:
    """The SuperNode's command line (``flower-supernode``'s options) and environment.

    Raises:
        ValueError: TLS material missing without ``insecure``, or an unusable data folder.
    """
    data_dir = Path(options.data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir}: not a folder")
    inventory = discover_site(data_dir)
    if not inventory.scans:
        raise ValueError(f"--data-dir {data_dir}: no scans in a layout fedsynth understands")
    if not options.insecure:
        if options.root_certificates is None or options.private_key is None:
            raise ValueError(
                "a hospital daemon needs --ca (the consortium's ca.crt) and --key (this site's "
                "private key); --insecure exists for tests only"
            )
        for path in (options.root_certificates, options.private_key):
            if not Path(path).is_file():
                raise ValueError(f"{path}: no such file")
    state_dir = Path(options.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    node_config: dict[str, str | int | float | bool] = {
        "data-dir": str(data_dir.resolve()),
        "state-dir": str(state_dir.resolve()),
    }
    if options.device:
        node_config["device"] = options.device
    if options.audit_log is not None:
        node_config["audit-log"] = str(Path(options.audit_log).resolve())
    if options.fault:
        node_config["fault"] = options.fault
    if options.skip_bad:
        node_config["skip-bad"] = True
    if options.max_epsilon is not None:
        if not options.max_epsilon > 0:
            raise ValueError(f"--max-epsilon {options.max_epsilon}: must be positive")
        node_config["max-epsilon"] = float(options.max_epsilon)
    # Flower's flower-supernode with shorter waits (fedsynth.client.supernode,
    # fedsynth.common.flower_waits)
    command = [sys.executable, "-m", "fedsynth.client.supernode", "--superlink", options.superlink]
    if options.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(Path(str(options.root_certificates)).resolve())]
        command += ["--auth-supernode-private-key", str(Path(str(options.private_key)).resolve())]
    command += ["--host", "127.0.0.1", "--port", str(options.runtime_port)]
    if options.warm_worker:  # fedsynth's worker is the SuperExec (fedsynth.client.worker)
        command += ["--isolation", "process"]
    command += ["--node-config", node_config_text(node_config)]
    return command, flower_env(state_dir / "flwr")


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so that the ClientApp and
    SuperExec processes the SuperNode starts in sessions of their own come back to this process
    when the SuperNode ends: they can then be waited for, and never linger as zombies in a
    container where this process is PID 1."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:
    """In the SuperNode's process, before it starts: SIGTERM when this daemon dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _reap(deadline: float) -> list[int]:
    """Wait for every child (adopted ones too) until ``deadline``; return those still running."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid == 0:
            time.sleep(0.2)
    return _children(os.getpid())


def run_supernode(options: ClientOptions, echo: Callable[[str], None] = print) -> int:
    """Run the SuperNode until it ends or this process gets SIGTERM/SIGINT; returns the exit code.

    On SIGTERM (``docker stop``, systemd) or Ctrl-C the SuperNode is asked to stop; the round in
    progress, if any, is abandoned: the site's state files are written atomically once a round
    is trained, so the state folder keeps the last finished round and nothing half-written. The
    SuperNode's helpers (SuperExec, the ClientApp) notice their parent is gone and stop; they
    get :data:`STOP_GRACE_S` to do so, then SIGKILL. The exit code is 128 + the signal's number,
    as a shell reports a process ended by that signal.
    """
    command, env = supernode_command(options)
    subreaper = _become_subreaper()
    # Same process group as this daemon, so that whoever signals or kills the group (a
    # terminal's Ctrl-C, `kill -- -PGID`, a service manager) reaches the SuperNode too; and it
    # gets SIGTERM should this process die without stopping it (Linux: PR_SET_PDEATHSIG).
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    received: list[int] = []
    worker: subprocess.Popen[bytes] | None = None

    def start_worker() -> subprocess.Popen[bytes]:
        """The warm ClientApp worker (fedsynth.client.worker), the SuperNode's SuperExec."""
        argv = [sys.executable, "-m", "fedsynth.client.worker",
                "--runtime-api-address", f"127.0.0.1:{options.runtime_port}",
                "--parent-pid", str(process.pid)]  # fmt: skip
        return subprocess.Popen(argv, env={**env, **WORKER_ENV}, preexec_fn=_die_with_parent)

    def forward(signum: int, frame: object) -> None:
        if not received:
            echo(
                f"fedsynth client: {signal.Signals(signum).name}: stopping the SuperNode; a round "
                f"in progress is abandoned, {options.state_dir} keeps the last finished round"
            )
        received.append(signum)
        for running in (process, worker):
            if running is not None:
                with contextlib.suppress(ProcessLookupError):
                    running.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    restarts = 0
    try:
        if options.warm_worker:
            worker = start_worker()
        while True:
            try:
                code = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if worker is not None and worker.poll() is not None and not received:
                # The worker only dies of a bug or a kill (a message's crash ends its own child):
                # start another, backing off, so that the site stays in the consortium.
                restarts += 1
                echo(
                    f"fedsynth client: the ClientApp worker exited ({worker.returncode}); "
                    f"starting it again ({restarts})"
                )
                time.sleep(min(30.0, 2.0**restarts))
                worker = start_worker()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(STOP_GRACE_S)
    if subreaper:
        left = _reap(time.monotonic() + STOP_GRACE_S)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            echo(f"fedsynth client: {len(left)} process(es) did not stop in time; killed")
        _reap(time.monotonic() + STOP_GRACE_S)
    if received:
        echo("fedsynth client: stopped")
        return 128 + received[0]
    return code
