"""The coordinator's rounds: send the global generators, check what comes back, aggregate, record.

:class:`Coordinator` drives a run over a Flower ``Grid`` (a SuperLink in deployment, the simulation
engine otherwise). Each round it

1. waits (with a deadline, logging who is missing) until ``federation.min_sites`` sites are online;
2. sends every sampled site a train instruction with the global networks;
3. collects replies until all are in or ``round_timeout_s`` passes; a site that disconnects is
   reported by the SuperLink and counted as failed, not waited for;
4. refuses, with the site and every reason, replies that break the content rule
   (:func:`fedsynth.common.messages.audit_reply`) or fail the numeric checks
   (:func:`fedsynth.server.validation.check_update`), and stops the run with a message naming the
   failed sites when fewer than ``min_sites`` valid updates remain;
5. aggregates (:mod:`fedsynth.server.strategy`), updates the moving average of the generators when
   ``federation.ema_decay`` is set (sites always receive the plain aggregate), asks the sites to
   score the new global model on their own validation data, evaluates centrally when a validation
   site is configured, and writes the round's checkpoint, record, JSONL line and TensorBoard
   scalars, then ``best.json`` (the best round so far, :mod:`fedsynth.server.round_store`), before
   announcing the round on the terminal.

A restarted coordinator with ``resume`` continues after the last complete round with the same
run key, so the sites find the state each round started from; the best round and the moving
average are restored from the run folder.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsynth.common.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointMetadata,
    load_checkpoint,
    load_into,
)
from fedsynth.common.config import RunConfig, dumps_config, write_resolved_config
from fedsynth.common.evaluation import evaluate_pairs, site_pairs
from fedsynth.common.io import atomic_save, atomic_write_text
from fedsynth.common.messages import (
    ARRAYS,
    CONFIG,
    SHARED_NETS,
    SITE_BUDGET,
    SITE_CRASH,
    SITE_ERROR,
    RoundInstruction,
    apply_update,
    audit_reply,
    flatten,
    from_record,
    record_bytes,
    scalar_metrics,
    to_record,
    unflatten,
)
from fedsynth.common.models import define_cyclegan
from fedsynth.server import warm_start
from fedsynth.server.certs import public_key_der
from fedsynth.server.round_store import (
    BestRound,
    RoundRecord,
    consider,
    ema_dir,
    latest_round,
    load_round,
    round_dir,
    save_round,
    scan_best,
    write_best,
)
from fedsynth.server.status import ROUNDS_LOG, StatusWriter
from fedsynth.server.strategy import SiteLevelDP, SiteUpdate, make_aggregator
from fedsynth.server.validation import check_update

logger = logging.getLogger("fedsynth.server")

RUN_FILE = "run.json"
WARM_STARTS = "warm-starts"  # beside the run folder: the phantom warm starts, by settings
SERVER_STATE = "server_state.pt"
POLL_S = 0.5  # seconds between pulls for replies (each costs the SuperLink a few SQL queries)
REPORT_EVERY_S = 30.0


class CoordinatorStoppedError(RuntimeError):
    """The run cannot go on (too few sites, too few valid updates); the message says why."""


class CoordinatorInterruptedError(BaseException):
    """SIGTERM or SIGINT reached the coordinator (``docker stop``, systemd, Ctrl-C).

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it. Raised only outside a round's checkpoint writing (see
    :meth:`Coordinator.stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Exchange:
    """Replies of one send, by node, and the nodes that did not answer in time."""

    replies: dict[int, Message] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)
    bytes_down: dict[int, int] = field(default_factory=dict)


@dataclass
class RoundSummary:
    """What :meth:`Coordinator.run_round` returns (also written to ``rounds.jsonl``)."""

    round: int
    sites: list[str]
    accepted: list[str]
    rejected: dict[str, list[str]]
    train_metrics: dict[str, dict[str, float]]
    eval_metrics: dict[str, dict[str, float]]
    aggregated: dict[str, float]
    central: dict[str, float]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    seconds: float
    train_seconds: float  # sending, training and collecting, up to aggregation
    slowest_site_seconds: float  # the slowest accepted site's own report (load data + train)
    overhead_seconds: float  # round wall time minus the slowest site's training time
    epsilon: dict[str, float] = field(default_factory=dict)  # cumulative, every site so far
    worst_epsilon: float | None = None
    budget_spent: list[str] = field(default_factory=list)  # sites that refused this round


def _weighted(metrics: Mapping[str, Mapping[str, float]], weight_key: str) -> dict[str, float]:
    """Example-weighted mean of every metric the sites report (weights from ``weight_key``)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for values in metrics.values():
        weight = float(values.get(weight_key, 1.0))
        for key, value in values.items():
            if key in (weight_key, "partition-id") or not math.isfinite(value):
                continue
            totals[key] = totals.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


def ema_step(
    ema: Mapping[str, torch.Tensor] | None, new: Mapping[str, torch.Tensor], decay: float
) -> dict[str, torch.Tensor]:
    """One step of the moving average: ``decay * ema + (1 - decay) * new`` per floating tensor
    (integer buffers follow ``new``); the first step (``ema`` None) starts at ``new``."""
    if ema is None:
        return {k: v.detach().clone() for k, v in new.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in new.items():
        value = value.detach()
        if value.is_floating_point() and key in ema:
            out[key] = ema[key].to(value.dtype) * decay + value * (1.0 - decay)
        else:
            out[key] = value.clone()
    return out


class Coordinator:
    """Runs a federation's rounds over ``grid`` and keeps everything under ``run_dir``.

    Args:
        grid: a Flower ``Grid``.
        config: the resolved run configuration (sent to every site each round).
        run_dir: where checkpoints, ``rounds.jsonl``, TensorBoard files and the config go.
        resume: continue after the last complete round found in ``run_dir``.
        site_dirs: simulation only, the folders of the simulated sites in partition order (names
            the sites in logs instead of node IDs).
        admitted: deployment only, site name -> public key (OpenSSH or PEM) of every hospital
            ``fedsynth server`` admitted. Only nodes with one of these keys take part, under
            that name, whatever name they registered with (see :meth:`screen_nodes`).
    """

    def __init__(
        self,
        grid: Any,
        config: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        site_dirs: Iterable[str] = (),
        admitted: Mapping[str, str] | None = None,
    ):
        self.grid = grid
        self.config = config
        self.fed = config.federation
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.site_dirs = [s for s in site_dirs if s]
        self.names: dict[int, str] = {}
        self.admitted = (
            None
            if admitted is None
            else {public_key_der(key): name for name, key in admitted.items()}
        )
        self.ignored: set[int] = set()  # online nodes whose key this coordinator did not admit
        self.known_sites: set[str] = set()  # sites that sent a valid update in some round
        self.epsilon: dict[str, float] = {}  # latest cumulative epsilon each site reported
        self.best: BestRound | None = None  # the best round so far (fedsynth.server.round_store)
        self.ema: dict[str, torch.Tensor] | None = None  # moving average (federation.ema_decay)
        self._ema_nets: dict[str, torch.nn.Module] | None = None
        self.aggregator = make_aggregator(self.fed, config.privacy)
        self.start_round = 1
        self.config_text = dumps_config(config)

        template = define_cyclegan(config.model, config.data.image_size, seed=config.training.seed)
        self.shared = SHARED_NETS[self.fed.share]
        self.nets = {name: template[name] for name in self.shared}
        self.state = flatten(self.nets, self.shared)
        self.run_key = self._open_run(resume)
        self.metadata = CheckpointMetadata(
            kind="federated",
            direction=config.data.direction,
            model=config.model,
            data=config.data,
            sites=[],
        )
        self._writer: Any = None
        self.status = StatusWriter(self.run_dir, self.fed.rounds)
        self.status.set("starting", self.start_round, "connecting to the SuperLink")
        self._writing = False  # inside a round's checkpoint: a signal waits until it is done
        self._deferred_signal: int | None = None

    # ------------------------------------------------------------------ run bookkeeping

    def _open_run(self, resume: bool) -> str:
        run_file = self.run_dir / RUN_FILE
        if resume:
            if not run_file.exists():
                raise CoordinatorStoppedError(
                    f"--resume {self.run_dir}: no {RUN_FILE}, not a run folder"
                )
            run_key = str(json.loads(run_file.read_text(encoding="utf-8"))["run_key"])
            last = latest_round(self.run_dir)
            if last is not None:
                _, networks, _ = load_round(self.run_dir, last)
                for name in self.shared:
                    self.nets[name].load_state_dict(networks[name])
                self.state = flatten(self.nets, self.shared)
                server_state = round_dir(self.run_dir, last) / SERVER_STATE
                if server_state.exists():
                    self.aggregator.load_state_dict(torch.load(server_state, weights_only=True))
                self.start_round = last + 1
                _, _, record = load_round(self.run_dir, last)
                self.known_sites = set(record.per_site)
                self.epsilon = dict(record.epsilon_per_site)
                self.best = scan_best(self.run_dir)
                if self.fed.ema_decay is not None:
                    self.ema = self._load_ema(last)
            elif (start := self._starting_point()) is not None:  # stopped before round 1
                self._start_from(start)
            logger.info("resuming %s after round %s", self.run_dir, last or 0)
            return run_key
        if latest_round(self.run_dir) is not None:
            raise CoordinatorStoppedError(
                f"{self.run_dir} already holds completed rounds: pass --resume to continue it, "
                "or choose another run folder"
            )
        run_key = uuid.uuid4().hex[:16]
        run_info: dict[str, Any] = {"run_key": run_key}
        start = self._starting_point()
        if start is not None:
            run_info["initial_generators"] = self._start_from(start)
        if self.config.phantom_warm_start and start is not None:
            run_info["warm_start"] = warm_start.describe(start)
        write_resolved_config(self.config, self.run_dir)
        atomic_write_text(run_file, json.dumps(run_info, indent=2) + "\n")
        return run_key

    def _starting_point(self) -> Path | None:
        """Round 1's generators: ``initial_generators``, the phantom warm start, or None."""
        if self.fed.initial_generators is not None:
            return Path(self.fed.initial_generators)
        if self.config.phantom_warm_start:
            # By default beside the run folder, so that the runs of one experiment share it.
            cache = self.fed.warm_start_cache or self.run_dir.parent / WARM_STARTS
            return warm_start.phantom_warm_start(self.config, Path(cache))
        return None

    def _start_from(self, path: Path) -> dict[str, Any]:
        """Load ``federation.initial_generators`` into the shared generators; what it was.

        Raises:
            CoordinatorStoppedError: not a checkpoint, or one of another model or direction.
        """
        try:
            metadata, networks = load_checkpoint(path)
            where = f"federation.initial_generators = {path}"
            if metadata.direction != self.config.data.direction:
                run_direction = self.config.data.direction
                raise CheckpointError(
                    f"{where}: translates {metadata.direction}, the run {run_direction}"
                )
            if metadata.model != self.config.model:
                raise CheckpointError(f"{where}: its model settings differ from the run's")
            if metadata.data.image_size != self.config.data.image_size:
                raise CheckpointError(
                    f"{where}: made for {metadata.data.image_size}-pixel slices, the run uses "
                    f"{self.config.data.image_size}"
                )
            loaded = [name for name in self.shared if name in networks]
            for name in loaded:
                load_into(self.nets[name], networks[name], where=where)
        except CheckpointError as exc:
            raise CoordinatorStoppedError(str(exc)) from None
        self.state = flatten(self.nets, self.shared)
        fresh = [name for name in self.shared if name not in networks]
        logger.info(
            "round 1 starts from %s (%s, %s%s)%s",
            path,
            metadata.kind,
            f"epoch {metadata.epoch}" if metadata.epoch is not None else f"round {metadata.round}",
            f", sites {', '.join(metadata.sites)}" if metadata.sites else "",
            f"; {', '.join(fresh)} start from random weights" if fresh else "",
        )
        return {
            "path": str(path.resolve()),
            "kind": metadata.kind,
            "epoch": metadata.epoch,
            "round": metadata.round,
            "sites": metadata.sites,
            "networks": loaded,
            "sha256": hashlib.sha256(
                (path if path.is_dir() else path.parent).joinpath(WEIGHTS_NAME).read_bytes()
            ).hexdigest(),
        }

    def _load_ema(self, round_number: int) -> dict[str, torch.Tensor] | None:
        folder = ema_dir(self.run_dir, round_number)
        if not folder.exists():
            logger.warning(
                "federation.ema_decay is set but round %d kept no moving average: it starts "
                "again at round %d's aggregate",
                round_number,
                round_number + 1,
            )
            return None
        _, networks = load_checkpoint(folder)
        return {
            f"{name}.{key}": value
            for name, state in networks.items()
            for key, value in state.items()
        }

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

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

    # ------------------------------------------------------------------ messaging

    def _wait_for_sites(self, round_number: int) -> list[int]:
        """Online nodes once ``min_sites`` are there and earlier participants had their grace."""
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
            absent = self.known_sites - set(online)
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
                    ", ".join(sorted(self.known_sites - {self.site_name(n) for n in nodes}))
                    or "none",
                )
                last_report = now
            time.sleep(POLL_S)

    def _exchange(self, nodes: list[int], kind: str, round_number: int) -> Exchange:
        instruction = RoundInstruction(
            round=round_number,
            lr=self.config.site_lr * self.fed.round_lr_factor(round_number, self.config.training),
            local_epochs=self.fed.local_epochs,
            local_steps=self.fed.local_steps or 0,
            proximal_mu=self.fed.proximal_mu if self.fed.strategy == "fedprox" else 0.0,
            share=self.fed.share,
            wire_dtype=self.fed.wire_dtype,
            run_key=self.run_key,
            run_config=self.config_text,
        )
        arrays = to_record(self.state, self.fed.wire_dtype, layout=True)
        down = record_bytes(arrays)
        messages = [
            Message(
                RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(instruction.to_record())}),
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
        result.missing = set(pending.values()) | undelivered
        return result

    # ------------------------------------------------------------------ one round

    def _select(self, nodes: list[int], round_number: int) -> list[int]:
        count = max(self.fed.min_sites, math.ceil(self.fed.fraction_train * len(nodes)))
        if count >= len(nodes):
            return nodes
        rng = random.Random(self.config.training.seed * 7919 + round_number)
        return sorted(rng.sample(nodes, count))

    def run_round(self, round_number: int) -> RoundSummary:
        start = time.perf_counter()
        nodes = self._select(self._wait_for_sites(round_number), round_number)
        exchange = self._exchange(nodes, "train", round_number)
        updates: list[SiteUpdate] = []
        rejected: dict[str, list[str]] = {}
        train_metrics: dict[str, dict[str, float]] = {}
        bytes_up: dict[str, int] = {}
        budget_spent: list[str] = []
        for node in sorted(exchange.missing):
            rejected[self.site_name(node)] = [
                f"no reply within federation.round_timeout_s = {self.fed.round_timeout_s:g} s"
            ]
        for node, reply in sorted(exchange.replies.items()):
            if reply.has_error():
                code = reply.error.code
                if code == SITE_BUDGET:
                    budget_spent.append(self.site_name(node))
                    rejected[self.site_name(node)] = [str(reply.error.reason)]
                    continue
                origin = "site" if code in (SITE_ERROR, SITE_CRASH) else "Flower"
                rejected[self.site_name(node)] = [f"{origin} error {code}: {reply.error.reason}"]
                continue
            problems = audit_reply(
                reply.content, kind="train", expected=self.state, wire_dtype=self.fed.wire_dtype
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
            bytes_up[site] = record_bytes(record)
            try:  # the data itself, read once: it may not be what the record's metadata says
                update = from_record(record, self.fed.wire_dtype, self.state)
            except ValueError as exc:
                rejected[site] = [f"arrays cannot be unpacked: {exc}"]
                continue
            state = apply_update(self.state, update)
            check = check_update(state, self.state, max_update_norm=self.fed.max_update_norm)
            examples = int(metrics.get("num-examples", 0))
            if examples <= 0:
                check.problems.append("num-examples must be a positive count")
            if not check.ok:
                rejected[site] = check.problems
                continue
            metrics["update-norm"] = float(check.delta_norm or 0.0)
            train_metrics[site] = metrics
            updates.append(SiteUpdate(site, state, examples))
        self.known_sites |= {u.site for u in updates}
        for site, reasons in sorted(rejected.items()):
            logger.warning("round %d: left out %s: %s", round_number, site, "; ".join(reasons))
        for site in [u.site for u in updates]:
            if "epsilon" in train_metrics[site]:
                self.epsilon[site] = train_metrics[site]["epsilon"]
        if budget_spent and self.config.privacy.on_budget_exhausted == "stop":
            raise CoordinatorStoppedError(
                f"round {round_number}: {', '.join(sorted(budget_spent))} spent its privacy "
                "budget and privacy.on_budget_exhausted is 'stop' ("
                + "; ".join(f"{s}: {rejected[s][0]}" for s in sorted(budget_spent))
                + ")"
            )
        if len(updates) < self.fed.min_sites:
            raise CoordinatorStoppedError(
                f"round {round_number}: {len(updates)} valid update(s), federation.min_sites is "
                f"{self.fed.min_sites}; failed or missing: "
                + (
                    ", ".join(f"{s} ({'; '.join(r)})" for s, r in sorted(rejected.items()))
                    or "none"
                )
            )
        train_seconds = time.perf_counter() - start
        slowest = max(m.get("seconds", 0.0) for m in train_metrics.values())

        self.state = self.aggregator.aggregate(self.state, updates)
        if isinstance(self.aggregator, SiteLevelDP):
            # Client-level DP protects each site's whole participation with the same epsilon.
            site_epsilon = self.aggregator.epsilon()
            for site in self.known_sites:
                self.epsilon[site] = site_epsilon
        for name, params in unflatten(self.state).items():
            self.nets[name].load_state_dict(params)
        if self.fed.ema_decay is not None:  # for the published model; sites get self.state
            self.ema = ema_step(self.ema, self.state, self.fed.ema_decay)

        eval_metrics: dict[str, dict[str, float]] = {}
        if self.fed.evaluate_sites:
            evaluation = self._exchange(sorted(exchange.replies), "evaluate", round_number)
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
        central = self._central_evaluation()
        aggregated = {f"train/{k}": v for k, v in _weighted(train_metrics, "num-examples").items()}
        aggregated.update(
            {
                f"eval/{k}": v
                for k, v in _weighted(eval_metrics, "num-examples").items()
                if k not in ("num-subjects", "seconds")
            }
        )
        aggregated.update({f"central/{k}": v for k, v in central.items()})
        seconds = time.perf_counter() - start
        summary = RoundSummary(
            round=round_number,
            sites=[self.site_name(n) for n in nodes],
            accepted=sorted(u.site for u in updates),
            rejected=rejected,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            aggregated=aggregated,
            central=central,
            bytes_up=bytes_up,
            bytes_down={self.site_name(n): b for n, b in exchange.bytes_down.items()},
            seconds=seconds,
            train_seconds=train_seconds,
            slowest_site_seconds=slowest,
            overhead_seconds=seconds - slowest,
            epsilon=dict(self.epsilon),
            worst_epsilon=max(self.epsilon.values()) if self.epsilon else None,
            budget_spent=sorted(budget_spent),
        )
        self._record(summary)
        return summary

    def _central_evaluation(self) -> dict[str, float]:
        site = self.fed.validation_site
        if site is None:
            return {}
        name, pairs = site_pairs(site, self.config.data, self.run_dir / "cache")
        net = self.nets["g_ab"]
        net.eval()

        def translate(slices: np.ndarray, chunk: int = 16) -> np.ndarray:
            with torch.no_grad():
                parts = [
                    net(torch.from_numpy(slices[i : i + chunk])[:, None])[:, 0]
                    for i in range(0, len(slices), chunk)
                ]
            return torch.cat(parts).numpy()

        report = evaluate_pairs(name, self.config.data.direction, pairs, translate)
        return {k: float(v) for k, v in report.mean.items()}

    def _record(self, summary: RoundSummary) -> None:
        with self._critical():
            self._write_round(summary)
        self.status.set("between rounds", summary.round, f"round {summary.round} complete")

    def _write_round(self, summary: RoundSummary) -> None:
        record = RoundRecord(
            round=summary.round,
            aggregated=summary.aggregated,
            per_site={**summary.train_metrics},
            bytes_per_site=summary.bytes_up,
            epsilon_per_site=dict(summary.epsilon),
            delta=self.config.privacy.delta if summary.epsilon else None,
            rejected=summary.rejected,
            seconds=summary.seconds,
            evaluation_per_site={**summary.eval_metrics},
        )
        self.metadata.sites = sorted(set(self.metadata.sites) | set(summary.accepted))
        folder = save_round(
            self.run_dir,
            self.nets,
            self.metadata,
            record,
            ema=self._ema_modules(),
            ema_decay=self.fed.ema_decay,
        )
        atomic_save(
            folder / SERVER_STATE, lambda tmp: torch.save(self.aggregator.state_dict(), tmp)
        )
        previous = self.best.round if self.best is not None else None
        self.best = consider(self.best, record)
        if self.best is not None:
            write_best(self.run_dir, self.best)
            if self.best.round != previous:
                logger.info("round %d: %s", summary.round, self.best.line)
        with (self.run_dir / ROUNDS_LOG).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(summary), sort_keys=True) + "\n")
        writer = self._tensorboard()
        for key, value in summary.aggregated.items():
            writer.add_scalar(key, value, summary.round)
        for site, metrics in summary.train_metrics.items():
            for key in ("loss_g", "loss_cycle", "seconds"):
                if key in metrics:
                    writer.add_scalar(f"site/{site}/{key}", metrics[key], summary.round)
        for site, epsilon in summary.epsilon.items():
            writer.add_scalar(f"privacy/epsilon/{site}", epsilon, summary.round)
        if summary.worst_epsilon is not None:
            writer.add_scalar("privacy/worst_epsilon", summary.worst_epsilon, summary.round)
        writer.add_scalar("round/seconds", summary.seconds, summary.round)
        writer.add_scalar("round/overhead_seconds", summary.overhead_seconds, summary.round)
        writer.flush()
        psnr = summary.aggregated.get("eval/psnr", summary.aggregated.get("central/psnr"))
        loss_g = summary.aggregated.get("train/loss_g")
        privacy = ""
        if summary.worst_epsilon is not None:
            worst = max(summary.epsilon, key=lambda s: summary.epsilon[s])
            privacy = f", epsilon max {summary.worst_epsilon:.2f} ({worst})"
        logger.info(
            "round %d/%d: %d/%d sites accepted%s, %s, %s%s, up %.2f MB/site, %.1f s "
            "(overhead %.1f s)",
            summary.round,
            self.fed.rounds,
            len(summary.accepted),
            len(summary.sites),
            f" (left out: {', '.join(sorted(summary.rejected))})" if summary.rejected else "",
            # Under DP the sites keep their losses (README, "What leaves a hospital").
            f"G {loss_g:.4f}" if loss_g is not None else "losses kept at the sites",
            f"PSNR {psnr:.2f} dB" if psnr is not None else "no evaluation",
            privacy,
            (sum(summary.bytes_up.values()) / max(len(summary.bytes_up), 1)) / 1e6,
            summary.seconds,
            summary.overhead_seconds,
        )

    def _ema_modules(self) -> dict[str, torch.nn.Module] | None:
        """The moving average as networks to checkpoint (None when off)."""
        if self.ema is None:
            return None
        if self._ema_nets is None:
            self._ema_nets = {name: copy.deepcopy(net) for name, net in self.nets.items()}
        for name, params in unflatten(self.ema).items():
            self._ema_nets[name].load_state_dict(params)
        return self._ema_nets

    # ------------------------------------------------------------------ whole run

    def run(self) -> list[RoundSummary]:
        """Run the remaining rounds; return their summaries."""
        summaries = []
        for round_number in range(self.start_round, self.fed.rounds + 1):
            summaries.append(self.run_round(round_number))
        if self._writer is not None:
            self._writer.close()
        logger.info("run complete: %s", round_dir(self.run_dir, self.fed.rounds))
        if self.best is not None:
            logger.info("%s: %s", self.best.line, round_dir(self.run_dir, self.best.round))
        self.status.set("finished", self.fed.rounds, f"all {self.fed.rounds} rounds complete")
        return summaries

    # ------------------------------------------------------------------ stopping

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Writing a round's checkpoint, ``rounds.jsonl`` and scalars: a signal that arrives
        meanwhile takes effect when the round is completely written."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._deferred_signal is not None:
            signum, self._deferred_signal = self._deferred_signal, None
            raise CoordinatorInterruptedError(signum)

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Turn SIGTERM and SIGINT into :class:`CoordinatorInterruptedError` for the duration:
        the round in progress is abandoned (sites' replies to it are not used), complete rounds
        stay as written, and ``--resume`` continues after the last of them. In any thread but
        the main one (where Python cannot install handlers) this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self._writing:
                self._deferred_signal = signum
                return
            raise CoordinatorInterruptedError(signum)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def interrupted(self, exc: CoordinatorInterruptedError) -> str:
        """Log and record an interruption; returns the one-line explanation."""
        last = latest_round(self.run_dir) or 0
        current = self.status.current
        doing = f"{current.state} in round {current.round}" if current and current.round else ""
        text = (
            f"interrupted ({exc}) while {doing or 'starting'}; that round is abandoned; rounds "
            f"1-{last} of {self.fed.rounds} are complete and --resume continues after round {last}"
            if last
            else f"interrupted ({exc}) while {doing or 'starting'}; no round is complete yet"
        )
        logger.warning("%s", text)
        self.status.set("interrupted", current.round if current else None, text)
        return text
