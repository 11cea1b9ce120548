"""A federation in one Python process, without Flower's processes: for benchmarks and tests.

:class:`InProcessGrid` replaces only the transport: it hands each message to the real ClientApp
functions (``fedsynth.client.app.train`` / ``evaluate``) with a per-node Flower ``Context``, the way
a SuperNode would, and keeps the replies until pulled. Sites train one after another, so a round
costs the sum of the sites' training instead of the slowest one's, but the arithmetic is the same as
a deployment's (``Coordinator`` and ``ClientApp`` are the real ones). Nodes can be silent (never
reply); ``crash_on`` kills the "coordinator" when it collects a message group's replies.
:func:`run` runs a simulated experiment's federation this way (``simulation.engine =
"inprocess"``, the :class:`~fedsynth.simulations.engines.Engine` of that name).

:func:`tiny_config` and :func:`phantom_sites` make the small runs the tests and examples use.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedsynth.client.app as client_app
from fedsynth.common.config import (
    RESOLVED_CONFIG_NAME,
    RunConfig,
    load_config,
    write_resolved_config,
)
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.common.phantom import generate_consortium
from fedsynth.server.coordinator import Coordinator, CoordinatorStoppedError
from fedsynth.server.service import RunOutcome
from fedsynth.server.status import STOPPED_FILE
from fedsynth.simulations.engines import Federation

TINY = [
    "data.spacing_mm=[6, 6, 6]",
    "data.image_size=32",
    "model.ngf=8",
    "model.n_blocks=1",
    "model.ndf=8",
    "model.d_layers=1",
    "training.batch_size=4",
    # Tests start from random weights unless they ask for the warm start (DP would turn it on).
    'federation.warm_start="none"',  # quoted: TINY also goes into TOML files
]


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(preset="cpu-small", overrides=[*TINY, *overrides], environ={})


def phantom_sites(out: Path, subjects: tuple[int, ...] = (3, 2, 1)) -> list[Path]:
    return generate_consortium(
        out,
        sites=len(subjects),
        subjects=list(subjects),
        seed=0,
        modalities=["T1w", "T2w"],
        voxel_size=4.0,
    )


class InProcessGrid:
    """An in-process stand-in for a SuperLink with the given nodes (``node_id -> node config``)."""

    def __init__(
        self,
        nodes: Mapping[int, Mapping[str, Any]],
        *,
        names: Mapping[int, str] | None = None,
        silent: Iterable[int] = (),
        crash_on: str | None = None,
        keys: Mapping[int, bytes] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        # A ServerApp process gets its identity from Flower; messages read it when created.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node, cfg in nodes.items()
        }
        self.names = dict(names or {})
        self.keys = dict(keys or {})  # node -> public key (PEM), as the SuperLink reports it
        self.silent = set(silent)
        self.crash_on = crash_on
        self.pending: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.replies: list[tuple[int, Message]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def get_nodes(self) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(node_id=n, name=self.names.get(n, ""), public_key=self.keys.get(n, b""))
            for n in self.contexts
        ]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
            ids.append(message_id)
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            handler = (
                client_app.train
                if message.metadata.message_type == MessageType.TRAIN
                else client_app.evaluate
            )
            reply = handler(message, self.contexts[node])
            self.replies.append((node, reply))
            self.pending[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if self.crash_on is not None and any(
            m.metadata.group_id == self.crash_on for m in self.pending.values()
        ):
            # The sites have trained (and saved their state); the coordinator dies before
            # it aggregates.
            raise KeyboardInterrupt(f"coordinator killed while collecting {self.crash_on}")
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]


def run(federation: Federation) -> RunOutcome:
    """The federated phase of ``simulation.engine = "inprocess"``: what
    :func:`fedsynth.simulations.engines.flower.run` runs on Flower, here on an
    :class:`InProcessGrid`.

    Simulated site ``i`` reads ``sites[i]`` exactly as a simulated SuperNode would (the same
    run-config keys), the coordinator writes the same run folder, and a coordinator that stops
    early (a privacy budget, too few sites) leaves the same ``STOPPED`` file.
    """
    config, sites, resume = federation.config, federation.sites, federation.resume
    run_dir = Path(federation.run_dir)
    federation.check_sites()
    if resume and not (run_dir / RESOLVED_CONFIG_NAME).exists():
        raise FileNotFoundError(f"resume {run_dir}: no {RESOLVED_CONFIG_NAME} there")
    if not resume:
        write_resolved_config(config, run_dir)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    cache_dir = federation.cache_dir
    cache = Path(cache_dir) if cache_dir is not None else run_dir / "cache"
    run_config: dict[str, Any] = {
        "site-dirs": ",".join(str(Path(s).resolve()) for s in sites),
        "cache-dir": str(cache.resolve()),
    }
    if federation.state_root is not None:
        run_config["state-root"] = str(Path(federation.state_root).resolve())
    if federation.site_misalignment:
        run_config["site-misalignment"] = ",".join(federation.site_misalignment)
    nodes = {
        index + 1: {"partition-id": index, "num-partitions": len(sites)}
        for index in range(len(sites))
    }
    grid = InProcessGrid(nodes, run_config=run_config)
    federation.echo(
        f"in-process federation: {len(sites)} sites, one after another (no Flower processes)"
    )
    coordinator = Coordinator(
        grid, config, run_dir, resume=resume, site_dirs=[str(s) for s in sites]
    )
    try:
        coordinator.run()
    except CoordinatorStoppedError as exc:
        atomic_write_text(run_dir / STOPPED_FILE, f"{exc}\n", mode=READABLE)
        return RunOutcome(status="finished:completed", run_id=1, run_dir=run_dir, stopped=str(exc))
    return RunOutcome(status="finished:completed", run_id=1, run_dir=run_dir, stopped=None)
