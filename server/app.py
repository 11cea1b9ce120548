"""The coordinator as a Flower ``ServerApp``.

The run config (``flwr run --run-config``, or the defaults in ``pyproject.toml``) names the
coordinator's resolved fedsynth configuration (``config-path``), the run folder (``run-dir``) and
whether to ``resume``; in simulation it also lists the simulated sites (``site-dirs``). All other
settings come from the fedsynth configuration, which the coordinator sends to every site.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsynth.common.config import ConfigError, load_config
from fedsynth.common.flower_waits import quick_object_pulls
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.common.logs import drop_opacus_root_handler
from fedsynth.server.coordinator import (
    Coordinator,
    CoordinatorInterruptedError,
    CoordinatorStoppedError,
)
from fedsynth.server.status import STOPPED_FILE, StatusWriter

logger = logging.getLogger("fedsynth.server")

app = ServerApp()


class CoordinatorEndedError(RuntimeError):
    """The coordinator ends its run early (bad configuration, too few sites, a signal).

    An ordinary exception, not ``SystemExit``: Flower's ServerApp runner catches it, pushes the
    task's outcome and records the run as ``finished:failed`` with this message at once, where a
    ``SystemExit`` skipped that and left the run "running" until its heartbeat expired.
    """


def _setup_logging(run_dir: Path) -> None:
    drop_opacus_root_handler()  # else every line would reach stderr twice (fedsynth.common.logs)
    root = logging.getLogger("fedsynth")
    if root.handlers:
        return
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(run_dir / "coordinator.log", encoding="utf-8"),
    ):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def _admitted(path: str) -> dict[str, str] | None:
    """The hospitals ``fedsynth server`` admitted (name -> public key), or None (simulation,
    ``--insecure``)."""
    if not path:
        return None
    try:
        sites = json.loads(Path(path).read_text(encoding="utf-8"))["sites"]
    except (OSError, ValueError, KeyError) as exc:
        raise CoordinatorEndedError(
            f"fedsynth coordinator: cannot read the admitted keys {path}: {exc}"
        ) from None
    return {str(name): str(key) for name, key in sites.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    quick_object_pulls()  # the sites' replies are read as soon as they are whole
    run_config = context.run_config
    config_path = str(run_config.get("config-path", ""))
    run_dir_text = str(run_config.get("run-dir", ""))
    try:
        config = load_config(Path(config_path) if config_path else None, environ={})
    except ConfigError as exc:
        raise CoordinatorEndedError(
            f"fedsynth coordinator: invalid configuration:\n{exc}"
        ) from None
    run_dir = Path(run_dir_text) if run_dir_text else config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir)
    site_dirs = str(run_config.get("site-dirs", "")).split(",")
    status = StatusWriter(run_dir, config.federation.rounds)
    try:
        coordinator = Coordinator(
            grid,
            config,
            run_dir,
            resume=bool(run_config.get("resume", False)),
            site_dirs=site_dirs,
            admitted=_admitted(str(run_config.get("admitted-keys", ""))),
        )
        status = coordinator.status
        with coordinator.stop_on_signals():
            try:
                coordinator.run()
            except CoordinatorInterruptedError as exc:
                why = coordinator.interrupted(exc)
                raise CoordinatorEndedError(f"fedsynth coordinator: {why}") from None
    except CoordinatorStoppedError as exc:
        logger.error("run stopped: %s", exc)
        atomic_write_text(run_dir / STOPPED_FILE, f"{exc}\n", mode=READABLE)
        current = status.current
        status.set("stopped", current.round if current else None, str(exc))
        raise CoordinatorEndedError(f"fedsynth coordinator stopped: {exc}") from None
