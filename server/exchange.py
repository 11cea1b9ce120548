"""The coordinator's exchange with the sites: which nodes take part, the round's messages to them,
and their replies, collected and screened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsynth.common.config import RunConfig
from fedsynth.common.messages import (
    ARRAYS,
    CONFIG,
    SITE_BUDGET,
    SITE_CRASH,
    SITE_ERROR,
    RoundInstruction,
    apply_update,
    audit_reply,
    config_digest,
    from_record,
    record_bytes,
    scalar_metrics,
    to_record,
)
from fedsynth.server.certs import public_key_der
from fedsynth.server.status import StatusWriter
from fedsynth.server.stopping import CoordinatorStoppedError
from fedsynth.server.strategy import SiteUpdate
from fedsynth.server.validation import check_update

logger = logging.getLogger("fedsynth.server")

POLL_S = 0.5  # seconds between pulls for replies (each costs the SuperLink a few SQL queries)
REPORT_EVERY_S = 30.0

State = Mapping[str, torch.Tensor]


@dataclass
class Exchange:
    """Replies of one send, by node, and the nodes that did not answer in time."""

    replies: dict[int, Message] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)
    bytes_down: dict[int, int] = field(default_factory=dict)


@dataclass
class TrainReplies:
    """A round's train replies, screened: the valid updates and every site left out, with why."""

    updates: list[SiteUpdate] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    budget_spent: list[str] = field(default_factory=list)  # sites that refused: budget spent


def round_instruction(
    config: RunConfig, round_number: int, *, run_key: str, config_text: str
) -> RoundInstruction:
    """What every site is told each round (train and evaluate alike), beside the networks.

    The configuration goes by its digest; :meth:`SiteExchange.exchange` adds the text itself
    for the sites that do not hold it yet."""
    return RoundInstruction(
        round=round_number,
        lr=config.site_lr * config.federation.round_lr_factor(round_number, config.training),
        run_key=run_key,
        config_digest=config_digest(config_text),
    )


class SiteExchange:
    """Who the sites are (admission and names) and the messages to and from them.

    Args:
        grid: a Flower ``Grid``.
        config: the run configuration (its ``federation`` table applies here).
        status: where the waits are reported (``status.json``).
        site_dirs: simulation only, the folders of the simulated sites in partition order.
        admitted: deployment only, site name -> public key of every admitted hospital.
    """

    def __init__(
        self,
        grid: Any,
        config: RunConfig,
        status: StatusWriter,
        *,
        site_dirs: Iterable[str] = (),
        admitted: Mapping[str, str] | None = None,
    ):
        self.grid = grid
        self.fed = config.federation
        self.status = status
        self.site_dirs = [s for s in site_dirs if s]
        # Nodes that showed they hold the run's configuration (a reply without error): their
        # instructions name it by digest only. Forgotten on any failed or missing reply.
        self.holding: set[int] = set()
        self.names: dict[int, str] = {}
        self.admitted = (
            None
            if admitted is None
            else {public_key_der(key): name for name, key in admitted.items()}
        )
        self.ignored: set[int] = set()  # online nodes whose key this coordinator did not admit

    # ------------------------------------------------------------------ who the sites are

    def site_name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def _learn_names(self) -> None:
        for info in self.grid.get_nodes():
            if getattr(info, "name", "") and info.node_id not in self.names:
                self.names[info.node_id] = str(info.name)

    def screen_nodes(self) -> list[int]:
        """The online nodes this coordinator may use.

        In a deployment Flower's SuperLink also serves its Control API on the hospitals' port,
        so anyone who reaches the port with the consortium's CA certificate can register a node
        key of their own and join (node authentication then only proves that the node holds
        *a* registered key). A node takes part only if its public key is one ``fedsynth
        server`` admitted, and it is named by that key, not by the name it registered under.
        Others are logged once and never sent anything.
        """
        online = sorted(self.grid.get_node_ids())
        if self.admitted is None:
            self._learn_names()
            return online
        for info in self.grid.get_nodes():
            node = int(info.node_id)
            if node in self.names or node in self.ignored:
                continue
            raw = getattr(info, "public_key", b"") or b""
            try:
                name = self.admitted.get(public_key_der(raw)) if raw else None
            except (ValueError, TypeError):
                name = None
            if name is None:
                self.ignored.add(node)
                logger.warning(
                    "ignoring node %d (registered as %r): its key is not one this coordinator "
                    "admitted, so someone registered it through the SuperLink's Control API; "
                    "restrict the coordinator's port to the consortium's hospitals",
                    node,
                    str(getattr(info, "name", "")),
                )
            else:
                self.names[node] = name
        return [n for n in online if n in self.names]

    def _name_from_partition(self, node_id: int, metrics: Mapping[str, float]) -> None:
        pid = metrics.get("partition-id")
        if pid is not None and 0 <= int(pid) < len(self.site_dirs):
            self.names[node_id] = Path(self.site_dirs[int(pid)]).name

    def wait_for_sites(self, round_number: int, known_sites: set[str]) -> list[int]:
        """Online nodes once ``min_sites`` are there and earlier participants (``known_sites``)
        had their grace."""
        start = time.monotonic()
        deadline = start + self.fed.round_timeout_s
        last_report = 0.0
        while True:
            nodes = self.screen_nodes()
            now = time.monotonic()
            needed = self.fed.min_sites
            if round_number == 1 and self.fed.start_sites is not None:
                needed = max(needed, self.fed.start_sites)
            online = [self.site_name(n) for n in nodes]
            absent = known_sites - set(online)
            self.status.set(
                "waiting",
                round_number,
                f"{len(nodes)} site(s) online, {needed} needed"
                + (f"; grace for {', '.join(sorted(absent))}" if absent else ""),
                online=online,
                waiting_for=sorted(absent),
            )
            if len(nodes) >= needed and (not absent or now - start >= self.fed.rejoin_grace_s):
                if absent:
                    logger.warning(
                        "round %d: going on without %s (offline after %.0f s of grace)",
                        round_number,
                        ", ".join(sorted(absent)),
                        self.fed.rejoin_grace_s,
                    )
                return nodes
            if now >= deadline:
                known = sorted(set(self.names.values()) - {self.site_name(n) for n in nodes})
                raise CoordinatorStoppedError(
                    f"round {round_number}: {len(nodes)} site(s) online after "
                    f"{self.fed.round_timeout_s:.0f} s, {needed} needed (federation.min_sites / "
                    "start_sites)" + (f"; not connected: {', '.join(known)}" if known else "")
                )
            if now - last_report >= REPORT_EVERY_S:
                logger.info(
                    "round %d: waiting for sites (%d online, need %d; earlier participants "
                    "offline: %s)",
                    round_number,
                    len(nodes),
                    needed,
                    ", ".join(sorted(known_sites - {self.site_name(n) for n in nodes})) or "none",
                )
                last_report = now
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ messages

    def exchange(
        self,
        nodes: list[int],
        kind: str,
        round_number: int,
        instruction: RoundInstruction,
        state: State,
        config_text: str,
    ) -> Exchange:
        """Send ``state`` and ``instruction`` to ``nodes`` (``kind`` "train" or "evaluate") and
        collect their replies until all are in or ``round_timeout_s`` passes.

        A node not known to hold the configuration (``config_text``, named by the instruction's
        digest) gets it in its instruction."""
        arrays = to_record(state, self.fed.wire_dtype, layout=True)
        down = record_bytes(arrays)
        full = replace(instruction, run_config=config_text).to_record()
        lean = instruction.to_record()
        messages = [
            Message(
                RecordDict(
                    {
                        ARRAYS: arrays,
                        CONFIG: ConfigRecord(lean if node in self.holding else full),
                    }
                ),
                dst_node_id=node,
                message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE,
                group_id=f"{kind}-{round_number}",
                ttl=self.fed.round_timeout_s,
            )
            for node in nodes
        ]
        accepted = set(self.grid.push_messages(messages))
        pending = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in messages
            if m.metadata.message_id in accepted
        }
        result = Exchange(bytes_down=dict.fromkeys(nodes, down))
        undelivered = set(nodes) - set(pending.values())
        for node in undelivered:
            logger.warning(
                "round %d %s: could not send to %s", round_number, kind, self.site_name(node)
            )
        self._collect(result, pending, nodes, kind, round_number)
        result.missing = set(pending.values()) | undelivered
        for node in nodes:
            reply = result.replies.get(node)
            if reply is not None and not reply.has_error():
                self.holding.add(node)
            else:
                self.holding.discard(node)
        return result

    def _collect(
        self,
        result: Exchange,
        pending: dict[str, int],
        nodes: list[int],
        kind: str,
        round_number: int,
    ) -> None:
        """Pull replies into ``result`` (and out of ``pending``) until all are in or the round's
        timeout passes."""
        deadline = time.monotonic() + self.fed.round_timeout_s
        last_report = time.monotonic()
        state = "training" if kind == "train" else "evaluating"
        names = [self.site_name(n) for n in nodes]
        while pending and time.monotonic() < deadline:
            waiting_for = [self.site_name(n) for n in pending.values()]
            self.status.set(
                state,
                round_number,
                f"{len(names) - len(waiting_for)} of {len(names)} sites replied",
                online=names,
                waiting_for=waiting_for,
            )
            for reply in self.grid.pull_messages(list(pending)):
                answered = reply.metadata.reply_to_message_id
                if answered in pending:
                    result.replies[pending.pop(answered)] = reply
            if pending:
                if time.monotonic() - last_report >= REPORT_EVERY_S:
                    waiting = ", ".join(self.site_name(n) for n in pending.values())
                    logger.info("round %d %s: waiting for %s", round_number, kind, waiting)
                    last_report = time.monotonic()
                time.sleep(POLL_S)

    # ------------------------------------------------------------------ screening

    def screen_train(self, exchange: Exchange, state: State) -> TrainReplies:
        """Each train reply checked against the content rule (:func:`audit_reply`) and the
        numeric checks (:func:`check_update`) on top of the global ``state``."""
        screened = TrainReplies()
        rejected = screened.rejected
        for node in sorted(exchange.missing):
            rejected[self.site_name(node)] = [
                f"no reply within federation.round_timeout_s = {self.fed.round_timeout_s:g} s"
            ]
        for node, reply in sorted(exchange.replies.items()):
            if reply.has_error():
                code = reply.error.code
                if code == SITE_BUDGET:
                    screened.budget_spent.append(self.site_name(node))
                    rejected[self.site_name(node)] = [str(reply.error.reason)]
                    continue
                origin = "site" if code in (SITE_ERROR, SITE_CRASH) else "Flower"
                rejected[self.site_name(node)] = [f"{origin} error {code}: {reply.error.reason}"]
                continue
            problems = audit_reply(
                reply.content, kind="train", expected=state, wire_dtype=self.fed.wire_dtype
            )
            metrics: dict[str, float] = {}
            if not problems:
                metrics = scalar_metrics(reply.content)
                self._name_from_partition(node, metrics)
            site = self.site_name(node)
            if problems:
                rejected[site] = problems
                continue
            record = reply.content.array_records[ARRAYS]
            screened.bytes_up[site] = record_bytes(record)
            try:  # the data itself, read once: it may not be what the record's metadata says
                update = from_record(record, self.fed.wire_dtype, state)
            except ValueError as exc:
                rejected[site] = [f"arrays cannot be unpacked: {exc}"]
                continue
            updated = apply_update(state, update)
            check = check_update(updated, state, max_update_norm=self.fed.max_update_norm)
            examples = int(metrics.get("num-examples", 0))
            if examples <= 0:
                check.problems.append("num-examples must be a positive count")
            if not check.ok:
                rejected[site] = check.problems
                continue
            metrics["update-norm"] = float(check.delta_norm or 0.0)
            screened.train_metrics[site] = metrics
            screened.updates.append(SiteUpdate(site, updated, examples))
        return screened

    def screen_evaluations(
        self, evaluation: Exchange, round_number: int
    ) -> dict[str, dict[str, float]]:
        """The sites' scores of the new global model; replies that fail or break the content rule
        are logged and left out."""
        eval_metrics: dict[str, dict[str, float]] = {}
        for node, reply in sorted(evaluation.replies.items()):
            site = self.site_name(node)
            if reply.has_error():
                logger.info(
                    "round %d: %s did not evaluate: %s", round_number, site, reply.error.reason
                )
                continue
            problems = audit_reply(reply.content, kind="evaluate", expected=None)
            if problems:
                logger.warning(
                    "round %d: ignored %s's evaluation: %s",
                    round_number,
                    site,
                    "; ".join(problems),
                )
                continue
            eval_metrics[site] = scalar_metrics(reply.content)
        return eval_metrics
