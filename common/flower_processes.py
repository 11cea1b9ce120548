"""Starting and stopping Flower's processes for fedsynth, on any machine of the consortium.

Used by ``fedsynth server`` (a SuperLink and a submitted run), ``fedsynth client`` (a SuperNode),
the simulation runner and the tests. Every process gets a run-local ``FLWR_HOME`` and runtime
dependency installation switched off (otherwise the SuperLink would ``uv sync`` the app, pulling
a several-GB CUDA torch). Processes are started in their own process group so that stopping one
also stops the app processes it spawned.

The Flower app submitted to the SuperLink is a small folder written by :func:`write_app_dir`: its
``pyproject.toml`` points Flower at ``fedsynth.server.app:app`` and ``fedsynth.client.app:app`` of
the installed fedsynth, so a coordinator and the hospitals need the same fedsynth version installed,
and no source tree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from fedsynth.common import PRIVATE_ENV

BIN = Path(sys.executable).parent
APP_NAME = "fedsynth"


class FlowerError(RuntimeError):
    """A Flower process failed to start or a command failed; the message has its output."""


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower commands: run-local ``FLWR_HOME``, no runtime installs, no
    telemetry and no update check (:data:`common.PRIVATE_ENV`, unless the operator set them)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    for key, value in PRIVATE_ENV.items():
        env.setdefault(key, value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    if extra:
        env.update(extra)
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and single-machine runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# Every run-config key the ServerApp and ClientApp read, with its default. The project's own
# pyproject.toml declares the same table (a test compares them), so the stock ``flwr run .``
# accepts every ``--run-config`` key fedsynth uses.
RUN_CONFIG: dict[str, str | int | bool] = {
    "config-path": "",  # the consortium's TOML, on the coordinator's disk
    "run-dir": "",  # the coordinator's run folder
    "resume": False,  # continue the run folder's run
    "site-dirs": "",  # simulation: one data folder per partition, comma-separated
    "state-root": "",  # simulation: each site's state under <state-root>/site-<k>
    "cache-dir": "",  # simulation: the shared preprocessed-slice cache
    "site-misalignment": "",  # simulation: one misalignment level per site, comma-separated
    "cpus-per-site": 0,  # simulation: torch threads per site (its Ray CPU share); 0 = torch's
    "admitted-keys": "",  # deployment: admitted.json, the hospitals the coordinator admitted
}


def write_app_dir(folder: Path, version: str = "0.1.0") -> Path:
    """Write the Flower app folder (just ``pyproject.toml``) that a run is submitted from."""
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=77"], "build-backend": "setuptools.build_meta"},
        "project": {"name": APP_NAME, "version": version, "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": APP_NAME,
                    "components": {
                        "serverapp": "fedsynth.server.app:app",
                        "clientapp": "fedsynth.client.app:app",
                    },
                    "config": dict(RUN_CONFIG),
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


@dataclass
class Process:
    """A started Flower process with its log file; ``stop()`` ends its whole process group."""

    name: str
    popen: subprocess.Popen[Any]
    log_path: Path
    _log: IO[str] | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the process group: a crash, as far as the rest of the federation can tell."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start(name: str, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("a", encoding="utf-8")
    popen = subprocess.Popen(
        list(command),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
    )
    return Process(name, popen, log_path, log)


@dataclass(frozen=True)
class Tls:
    """Certificate files for a TLS SuperLink (see ``fedsynth certs``)."""

    ca: Path
    cert: Path
    key: Path


def start_superlink(
    *,
    flwr_home: Path,
    host: str,
    port: int,
    log_path: Path,
    tls: Tls | None,
    node_auth: bool,
    simulation: bool = False,
    database: Path | None = None,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start ``flower-superlink`` and wait until it listens. ``tls=None`` means ``--insecure``.

    ``env``: extra environment (e.g. ``RAY_ADDRESS``, which the simulation's ``ray.init``
    reads to attach to an existing Ray cluster).
    """
    command = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port)]
    command += ["--disable-runtime-dependency-installation"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)]
        command += ["--ssl-keyfile", str(tls.key)]
    if node_auth:
        command.append("--enable-supernode-auth")
    if simulation:
        command.append("--simulation")
    if database is not None:
        command += ["--database", str(database)]
    process = start("superlink", command, flower_env(flwr_home, env), log_path)
    try:
        wait_for_port(
            "127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout, process.popen
        )
    except FlowerError as exc:
        process.stop()
        raise FlowerError(f"SuperLink did not start: {exc}\n{process.log_text()[-4000:]}") from None
    return process


def start_supernode(
    *,
    flwr_home: Path,
    superlink: str,
    node_config: Mapping[str, str | int | float | bool],
    log_path: Path,
    root_certificates: Path | None,
    private_key: Path | None,
    extra_env: Mapping[str, str] | None = None,
) -> Process:
    """Start ``flower-supernode`` (``root_certificates=None`` means ``--insecure``)."""
    command = [str(BIN / "flower-supernode"), "--superlink", superlink]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += ["--node-config", node_config_text(node_config)]
    return start("supernode", command, flower_env(flwr_home, extra_env), log_path)


def node_config_text(values: Mapping[str, str | int | float | bool]) -> str:
    """``key="value" n=3`` as ``--node-config`` wants it (strings quoted, TOML style)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={json.dumps(str(value))}")
    return " ".join(parts)


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None
) -> None:
    """Add a SuperLink connection to ``FLWR_HOME/config.toml`` (what ``flwr run`` targets)."""
    path = Path(flwr_home) / "config.toml"
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    import tomllib

    tree: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    tree.setdefault("superlink", {})["default"] = name
    tree["superlink"][name] = entry
    path.write_text(tomli_w.dumps(tree), encoding="utf-8")


def flwr(args: Sequence[str], flwr_home: Path, timeout: float = 120.0) -> str:
    """Run a ``flwr`` CLI command; return its stdout or raise with its output."""
    result = subprocess.run(
        [str(BIN / "flwr"), *args],
        env=flower_env(flwr_home, {"COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise FlowerError(
            f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def register_node(flwr_home: Path, connection: str, public_key: Path, name: str) -> int:
    """``flwr supernode register``: admit a hospital's public key under a site name."""
    out = flwr(
        [
            "supernode",
            "register",
            str(Path(public_key).resolve()),
            connection,
            "--name",
            name,
            "--format",
            "json",
        ],
        flwr_home,
    )
    data = json.loads(out)
    if not data.get("success", False):
        raise FlowerError(f"registering {public_key} failed: {out}")
    return int(data["node-id"])


def submit_run(
    app_dir: Path,
    connection: str,
    flwr_home: Path,
    run_config: Mapping[str, str | int | float | bool],
    num_supernodes: int | None = None,
    cpus_per_node: int | None = None,
    gpus_per_node: float | None = None,
) -> int:
    """``flwr run``: submit the fedsynth app with a run config; return the Flower run ID.

    Simulation only: ``num_supernodes`` (always pass it: Flower's default is 2), and the Ray
    resources each simulated node reserves (Flower's default is 2 CPUs and no GPU).
    """
    args = ["run", str(app_dir), connection, "--format", "json"]
    args += ["--run-config", node_config_text(run_config)]
    federation = []
    if num_supernodes is not None:
        federation.append(f"num-supernodes={num_supernodes}")
    if cpus_per_node is not None:
        federation.append(f"client-resources-num-cpus={int(cpus_per_node)}")
    if gpus_per_node is not None:
        federation.append(f"client-resources-num-gpus={float(gpus_per_node)}")
    if federation:
        args += ["--federation-config", " ".join(federation)]
    out = flwr(args, flwr_home)
    data = json.loads(out)
    if not data.get("success", False):
        raise FlowerError(f"flwr run did not start a run: {out}")
    return int(data["run-id"])


@contextlib.contextmanager
def _flwr_home(flwr_home: Path) -> Iterator[None]:
    """Point Flower's in-process configuration readers (which read ``FLWR_HOME``) at a folder."""
    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


class RunStatusReader:
    """A run's status, read in this process through the SuperLink's Control API.

    One client for a whole run, where each ``flwr ls`` process cost about 2.2 CPU-s (and the
    coordinator polled every few seconds, taking up to half a core from sites training on the
    same machine). Flower internals used, pinned with flwr 1.42 (what ``flwr ls`` itself does):
    ``flwr.cli.flower_config.read_superlink_connection``,
    ``flwr.cli.utils.init_http_client_from_connection``, ``flwr.proto.control_pb2.ListRunsRequest``
    and ``flwr.common.serde.run_from_proto``.
    """

    def __init__(self, connection: str, flwr_home: Path):
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        # httpx logs every request at INFO: a line a second in the coordinator's output.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            with _flwr_home(flwr_home):
                self._client = init_http_client_from_connection(
                    read_superlink_connection(connection)
                )
        except Exception as exc:  # click's, httpx's and Flower's own errors alike
            raise FlowerError(
                f"cannot reach the SuperLink's Control API ({connection}): {exc}"
            ) from exc

    def status(self, run_id: int) -> str:
        """``running``, ``finished:completed``, ``finished:failed``, ``finished:stopped``, ..."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            response = self._client.ListRuns(ListRunsRequest(run_id=run_id))
        except Exception as exc:
            raise FlowerError(f"listing run {run_id} failed: {exc}") from exc
        if not response.run_dict:
            raise FlowerError(f"run {run_id} unknown to the SuperLink")
        run = run_from_proto(next(iter(response.run_dict.values())))
        if run.status.sub_status:
            return f"{run.status.status}:{run.status.sub_status}"
        return str(run.status.status)

    def close(self) -> None:
        self._client.close()


def wait_run(
    run_id: int,
    reader: RunStatusReader,
    timeout: float,
    poll: float = 2.0,
    watch: Sequence[Process] = (),
) -> str:
    """Block until the run is finished; return its final status (``finished:...``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = reader.status(run_id)
        if status.startswith("finished"):
            return status
        for process in watch:
            if not process.alive():
                raise FlowerError(f"{process.name} exited:\n{process.log_text()[-4000:]}")
        time.sleep(poll)
    raise FlowerError(f"run {run_id} not finished after {timeout:.0f} s")
