"""A federation in one Python process, without Flower's processes: for benchmarks and tests.

:class:`InProcessGrid` replaces only the transport: it hands each message to the real ClientApp
functions (``client.app.train`` / ``evaluate``) with a per-node Flower ``Context``, the way a
SuperNode would, and keeps the replies until pulled. Sites train one after another, so a round
costs the sum of the sites' training instead of the slowest one's, but the arithmetic is the
same as a deployment's (``Coordinator`` and ``ClientApp`` are the real ones). Nodes can be silent
(never reply); ``crash_on`` kills the "coordinator" when it collects a message group's replies.

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

import client.app as client_app
from common.config import RunConfig, load_config
from common.phantom import generate_consortium

TINY = [
    "data.spacing_mm=[6, 6, 6]",
    "data.image_size=32",
    "model.ngf=8",
    "model.n_blocks=1",
    "model.ndf=8",
    "model.d_layers=1",
    "training.batch_size=4",
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
    ):
        # A ServerApp process gets its identity from Flower; messages read it when created.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={}
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
