"""``fedsynth server``: start a SuperLink, admit the hospitals, run the coordinator, stop cleanly.

The run folder holds everything: ``config.resolved.toml`` (what every site receives), the Flower
state (``flwr/``, ``superlink.db`` so that node registrations survive a restart), the SuperLink log,
``coordinator.log``, ``rounds.jsonl``, TensorBoard scalars and ``rounds/round-NNNN`` checkpoints.

TLS and node authentication are on unless ``insecure`` is asked for explicitly; then the coordinator
prints a warning on every start, because anyone who can reach the port can join and read the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.common import __version__
from fedsynth.common.config import RESOLVED_CONFIG_NAME, RunConfig, write_resolved_config
from fedsynth.common.flower_processes import (
    FlowerError,
    Process,
    RunStatusReader,
    Tls,
    register_node,
    start_superlink,
    submit_run,
    wait_run,
    write_app_dir,
    write_connection,
)
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.server.round_store import latest_round
from fedsynth.server.status import STATUS_FILE, STOPPED_FILE, StatusWriter, process_alive

logger = logging.getLogger("fedsynth.server")

CONNECTION = "fedsynth"
ADMITTED_FILE = "admitted.json"
INSECURE_WARNING = (
    "INSECURE: TLS and node authentication are OFF. Traffic (model weights, metrics) is "
    "readable on the network and any machine that reaches this port can join the federation. "
    "Use this only on a loopback or test network."
)


@dataclass
class ServeOptions:
    """How to run the coordinator.

    Attributes:
        run_dir: the run folder (created; with ``resume`` it must hold a run).
        host, port: where the SuperLink listens (hospitals connect to ``host:port``).
        certs: a folder from ``fedsynth certs`` (``ca.crt``, ``server.crt``, ``server.key``);
            ``None`` only together with ``insecure``.
        sites: site name -> public key file to register (node authentication).
        insecure: no TLS, no node authentication.
        resume: continue the run in ``run_dir`` after its last complete round.
        timeout_s: give up on the whole run after this long (default: rounds x (round timeout x 2)).
        site_dirs / state_root / num_supernodes: simulation only.
        cache_dir: simulation only, the sites' preprocessed-slice cache (default: run/cache).
        site_misalignment: simulation only, one misalignment level per site.
        cpus_per_site / gpus_per_site: simulation only, Ray resources per simulated site (a
            GPU share below 1 lets several sites share a GPU).
        ray_address: simulation only, attach to this Ray cluster instead of starting one.
    """

    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    certs: Path | None = None
    sites: Mapping[str, Path] = field(default_factory=dict)
    insecure: bool = False
    resume: bool = False
    timeout_s: float | None = None
    simulation: bool = False
    site_dirs: Sequence[Path] = ()
    state_root: Path | None = None
    num_supernodes: int | None = None
    cache_dir: Path | None = None
    site_misalignment: Sequence[str] = ()
    cpus_per_site: int | None = None
    gpus_per_site: float | None = None
    ray_address: str | None = None


@dataclass
class RunOutcome:
    status: str
    run_id: int
    run_dir: Path
    stopped: str | None  # the coordinator's reason when it stopped early


def write_admitted(run_dir: Path, sites: Mapping[str, Path]) -> Path:
    """``<run>/admitted.json``: the public key of every hospital this coordinator admitted.

    Flower's SuperLink serves its Control API on the hospitals' port, so anyone who can reach that
    port with the CA certificate can register a node key of their own (tested). The coordinator
    therefore trusts only nodes whose key is listed here, under the name given here (see
    :meth:`fedsynth.server.exchange.SiteExchange.screen_nodes`). On ``--resume`` without sites the
    file from the first start is kept. Public keys only: the file is not secret.
    """
    path = Path(run_dir) / ADMITTED_FILE
    if sites or not path.exists():
        keys = {name: Path(key).read_text(encoding="utf-8").strip() for name, key in sites.items()}
        atomic_write_text(path, json.dumps({"sites": keys}, indent=1) + "\n", mode=READABLE)
    return path


def tls_files(certs: Path) -> Tls:
    certs = Path(certs).resolve()
    files = Tls(ca=certs / "ca.crt", cert=certs / "server.crt", key=certs / "server.key")
    missing = [p for p in (files.ca, files.cert, files.key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{certs}: missing {', '.join(p.name for p in missing)} (make them with "
            "`fedsynth certs`)"
        )
    return files


class Superlink:
    """A SuperLink for one run folder, as a context manager that always stops it."""

    def __init__(self, options: ServeOptions):
        if not options.insecure and options.certs is None:
            raise ValueError("a coordinator needs --certs (or --insecure, for tests only)")
        self.options = options
        self.run_dir = Path(options.run_dir)
        self.flwr_home = self.run_dir / "flwr"
        self.tls = None if options.insecure else tls_files(Path(str(options.certs)))
        self.process: Process | None = None

    def __enter__(self) -> Superlink:
        opts = self.options
        if opts.insecure and not opts.simulation:
            logger.warning(INSECURE_WARNING)
        self.process = start_superlink(
            flwr_home=self.flwr_home,
            host=opts.host,
            port=opts.port,
            log_path=self.run_dir / "superlink.log",
            tls=self.tls,
            node_auth=not opts.insecure and not opts.simulation,
            simulation=opts.simulation,
            database=None if opts.simulation else self.run_dir / "superlink.db",
            env={"RAY_ADDRESS": opts.ray_address} if opts.ray_address else None,
        )
        # Operators (and the crash tests) find the SuperLink's process group here.
        (self.run_dir / "superlink.pid").write_text(f"{self.process.popen.pid}\n", encoding="utf-8")
        local = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
        write_connection(
            self.flwr_home,
            CONNECTION,
            f"{local}:{opts.port}",
            None if self.tls is None else self.tls.ca,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop()
            (self.run_dir / "superlink.pid").unlink(missing_ok=True)

    def register(self, sites: Mapping[str, Path]) -> dict[str, int]:
        """Register each site's public key under its name (already registered keys are kept)."""
        ids = {}
        for name, key in sites.items():
            try:
                ids[name] = register_node(self.flwr_home, CONNECTION, key, name)
                logger.info("registered %s (node %d)", name, ids[name])
            except FlowerError as exc:
                if "already" in str(exc).lower():
                    logger.info("%s is already registered", name)
                    continue
                raise
        return ids


class ServerInterruptedError(KeyboardInterrupt):
    """SIGTERM (``docker stop``, systemd) or Ctrl-C reached ``fedsynth server``."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``docker stop``, systemd) into an interrupt so the SuperLink we started
    is stopped on the way out instead of being orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise ServerInterruptedError(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tail(path: Path, offset: int, echo: Callable[[str], None]) -> int:
    if not path.exists():
        return offset
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        handle.seek(offset)
        for line in handle:
            echo(line.rstrip("\n"))
        return handle.tell()


def _wait_for_coordinator(run_dir: Path, timeout: float) -> None:
    """After the SuperLink stopped, give the coordinator process (the ServerApp, which Flower
    runs in a process group of its own and which notices its parent is gone within a second)
    time to record why it stopped and to exit, so that ``status.json`` says so rather than a
    dead pid, and no coordinator outlives ``fedsynth server``."""
    deadline = time.monotonic() + timeout
    try:
        pid = int(json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8")).get("pid", 0))
    except (OSError, ValueError):
        return
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.2)


def _record_flwr_stop(run_dir: Path, run_id: int, rounds: int) -> None:
    """Record that an operator ended the run with ``flwr stop``.

    Flower ends the ServerApp with a signal then, which the coordinator records as an
    interruption ("interrupted (SIGINT) ... --resume"), as if the machine had gone down. Once it
    has exited, say what happened instead: the run was stopped on purpose, and where it stands.
    """
    _wait_for_coordinator(run_dir, timeout=30.0)
    last = latest_round(run_dir) or 0
    text = f"stopped with `flwr stop` (Flower run {run_id}) after round {last} of {rounds}" + (
        "; --resume continues after it" if 0 < last < rounds else ""
    )
    atomic_write_text(run_dir / STOPPED_FILE, f"{text}\n", mode=READABLE)
    StatusWriter(run_dir, rounds).set("stopped", last or None, text)


def run_federation(
    config: RunConfig, options: ServeOptions, echo: Callable[[str], None] = print
) -> RunOutcome:
    """Start the SuperLink, register sites, submit the run, follow it, stop the SuperLink."""
    run_dir = Path(options.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / RESOLVED_CONFIG_NAME
    if options.resume:
        if not config_path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: no config.resolved.toml there")
    else:
        write_resolved_config(config, run_dir)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    (run_dir / STATUS_FILE).unlink(missing_ok=True)  # the new coordinator writes its own
    rounds = config.federation.rounds
    timeout = options.timeout_s or rounds * 2 * config.federation.round_timeout_s + 600
    run_config: dict[str, str | int | float | bool] = {
        "config-path": str(config_path.resolve()),
        "run-dir": str(run_dir.resolve()),
        "resume": options.resume,
    }
    if options.simulation:
        run_config["site-dirs"] = ",".join(str(Path(s).resolve()) for s in options.site_dirs)
        cache = Path(options.cache_dir) if options.cache_dir is not None else run_dir / "cache"
        run_config["cache-dir"] = str(cache.resolve())
        if options.state_root is not None:
            run_config["state-root"] = str(Path(options.state_root).resolve())
        if options.site_misalignment:
            run_config["site-misalignment"] = ",".join(options.site_misalignment)
        if options.cpus_per_site is not None:
            run_config["cpus-per-site"] = options.cpus_per_site
    try:
        return _serve(config, options, run_config, timeout, echo)
    except KeyboardInterrupt:
        _wait_for_coordinator(run_dir, timeout=20.0)
        raise


def _serve(
    config: RunConfig,
    options: ServeOptions,
    run_config: dict[str, str | int | float | bool],
    timeout: float,
    echo: Callable[[str], None],
) -> RunOutcome:
    run_dir = Path(options.run_dir)
    if not options.insecure and not options.simulation:
        run_config["admitted-keys"] = str(write_admitted(run_dir, options.sites).resolve())
    with _terminate_as_interrupt(), Superlink(options) as link:
        if options.sites:
            link.register(options.sites)
        app_dir = write_app_dir(run_dir / "app", __version__)
        run_id = submit_run(
            app_dir,
            CONNECTION,
            link.flwr_home,
            run_config,
            num_supernodes=options.num_supernodes,
            cpus_per_node=options.cpus_per_site,
            gpus_per_node=options.gpus_per_site,
        )
        echo(f"run {run_id} submitted; following {run_dir / 'coordinator.log'}")
        log = run_dir / "coordinator.log"
        offset = log.stat().st_size if log.exists() else 0  # a resumed run: only new lines
        deadline = time.monotonic() + timeout
        status = "running"
        assert link.process is not None
        reader = RunStatusReader(CONNECTION, link.flwr_home)
        try:
            while True:
                offset = _tail(run_dir / "coordinator.log", offset, echo)
                try:
                    status = wait_run(run_id, reader, timeout=2.0, poll=1.0, watch=[link.process])
                    break
                except FlowerError as exc:
                    if "not finished" not in str(exc):
                        raise
                if time.monotonic() > deadline:
                    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s")
        finally:
            reader.close()
        _tail(run_dir / "coordinator.log", offset, echo)
    if status == "finished:stopped":
        _record_flwr_stop(run_dir, run_id, config.federation.rounds)
    stopped_file = run_dir / STOPPED_FILE
    stopped = stopped_file.read_text(encoding="utf-8").strip() if stopped_file.exists() else None
    return RunOutcome(status=status, run_id=run_id, run_dir=run_dir, stopped=stopped)
