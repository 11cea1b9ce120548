"""``fedsynth client``: a hospital's daemon, a Flower SuperNode running fedsynth's ClientApp.

The node config carries only what the hospital decides: its data folder, device and state
folder. Model, preprocessing and training settings come from the coordinator each round. Before
connecting, the data folder is checked with the same discovery as ``fedsynth inspect`` so that a
wrong path fails here, with the path, rather than as a refused round later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.data.discovery import discover_site
from common.flower import BIN, flower_env, node_config_text

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


def supernode_command(options: ClientOptions) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command line and environment for these options.

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
    if options.max_epsilon is not None:
        if not options.max_epsilon > 0:
            raise ValueError(f"--max-epsilon {options.max_epsilon}: must be positive")
        node_config["max-epsilon"] = float(options.max_epsilon)
    command = [str(BIN / "flower-supernode"), "--superlink", options.superlink]
    if options.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(Path(str(options.root_certificates)).resolve())]
        command += ["--auth-supernode-private-key", str(Path(str(options.private_key)).resolve())]
    command += ["--host", "127.0.0.1", "--port", str(options.runtime_port)]
    command += ["--node-config", node_config_text(node_config)]
    return command, flower_env(state_dir / "flwr")


def exec_supernode(options: ClientOptions) -> None:
    """Replace this process with the SuperNode (signals and exit codes are the SuperNode's)."""
    command, env = supernode_command(options)
    os.execve(command[0], command, env)
