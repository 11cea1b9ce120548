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

The round loop is here; the messages to and from the sites (node admission, sending, collecting
and screening replies) are in :mod:`fedsynth.server.exchange`, what a completed round writes in
:mod:`fedsynth.server.run_records`, and the errors that end a run early in
:mod:`fedsynth.server.stopping`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.common.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointMetadata,
    load_checkpoint,
    load_into,
)
from fedsynth.common.config import RunConfig, dumps_config, write_resolved_config
from fedsynth.common.evaluation import evaluate_pairs, site_pairs
from fedsynth.common.io import atomic_write_text
from fedsynth.common.messages import SHARED_NETS, flatten, unflatten
from fedsynth.common.models import define_cyclegan
from fedsynth.server import warm_start
from fedsynth.server.exchange import Exchange, SiteExchange, TrainReplies, round_instruction
from fedsynth.server.round_store import BestRound, latest_round, load_round, round_dir, scan_best
from fedsynth.server.run_records import (
    SERVER_STATE,
    RoundSummary,
    Scalars,
    aggregated_metrics,
    announce_round,
    append_round_line,
    load_ema,
    record_best,
    round_record,
    save_round_checkpoint,
)
from fedsynth.server.status import ROUNDS_LOG, StatusWriter
from fedsynth.server.stopping import (
    CoordinatorInterruptedError,
    CoordinatorStoppedError,
    SignalGuard,
)
from fedsynth.server.strategy import SiteLevelDP, SiteUpdate, make_aggregator

# Imported from here elsewhere (app, simulations, tests).
__all__ = [
    "ROUNDS_LOG",
    "RUN_FILE",
    "WARM_STARTS",
    "Coordinator",
    "CoordinatorInterruptedError",
    "CoordinatorStoppedError",
    "RoundSummary",
    "ema_step",
]

logger = logging.getLogger("fedsynth.server")

RUN_FILE = "run.json"
WARM_STARTS = "warm-starts"  # beside the run folder: the phantom warm starts, by settings


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
            that name, whatever name they registered with (see
            :meth:`SiteExchange.screen_nodes`).
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
        self.status = StatusWriter(self.run_dir, self.fed.rounds)
        self.sites = SiteExchange(grid, config, self.status, site_dirs=site_dirs, admitted=admitted)
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
        self.scalars = Scalars(self.run_dir)
        self.status.set("starting", self.start_round, "connecting to the SuperLink")
        self._signals = SignalGuard()

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
                    self.ema = load_ema(self.run_dir, last)
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

    def _ema_modules(self) -> dict[str, torch.nn.Module] | None:
        """The moving average as networks to checkpoint (None when off)."""
        if self.ema is None:
            return None
        if self._ema_nets is None:
            self._ema_nets = {name: copy.deepcopy(net) for name, net in self.nets.items()}
        for name, params in unflatten(self.ema).items():
            self._ema_nets[name].load_state_dict(params)
        return self._ema_nets

    # ------------------------------------------------------------------ one round

    def _select(self, nodes: list[int], round_number: int) -> list[int]:
        count = max(self.fed.min_sites, math.ceil(self.fed.fraction_train * len(nodes)))
        if count >= len(nodes):
            return nodes
        rng = random.Random(self.config.training.seed * 7919 + round_number)
        return sorted(rng.sample(nodes, count))

    def run_round(self, round_number: int) -> RoundSummary:
        """One round: send, collect and screen the updates, aggregate, evaluate, record."""
        start = time.perf_counter()
        nodes = self._select(
            self.sites.wait_for_sites(round_number, self.known_sites), round_number
        )
        exchange = self._exchange(nodes, "train", round_number)
        replies = self._accept(self.sites.screen_train(exchange, self.state), round_number)
        train_seconds = time.perf_counter() - start
        slowest = max(m.get("seconds", 0.0) for m in replies.train_metrics.values())
        self._aggregate(replies.updates)
        eval_metrics = self._evaluate_sites(sorted(exchange.replies), round_number)
        central = self._central_evaluation()
        aggregated = aggregated_metrics(replies.train_metrics, eval_metrics, central)
        seconds = time.perf_counter() - start
        summary = RoundSummary(
            round=round_number,
            sites=[self.sites.site_name(n) for n in nodes],
            accepted=sorted(u.site for u in replies.updates),
            rejected=replies.rejected,
            train_metrics=replies.train_metrics,
            eval_metrics=eval_metrics,
            aggregated=aggregated,
            central=central,
            bytes_up=replies.bytes_up,
            bytes_down={self.sites.site_name(n): b for n, b in exchange.bytes_down.items()},
            seconds=seconds,
            train_seconds=train_seconds,
            slowest_site_seconds=slowest,
            overhead_seconds=seconds - slowest,
            epsilon=dict(self.epsilon),
            worst_epsilon=max(self.epsilon.values()) if self.epsilon else None,
            budget_spent=sorted(replies.budget_spent),
        )
        self._record(summary)
        return summary

    def _exchange(self, nodes: list[int], kind: str, round_number: int) -> Exchange:
        """Send the global networks and the round's instruction to ``nodes``; their replies."""
        instruction = round_instruction(
            self.config, round_number, run_key=self.run_key, config_text=self.config_text
        )
        return self.sites.exchange(
            nodes, kind, round_number, instruction, self.state, self.config_text
        )

    def _accept(self, replies: TrainReplies, round_number: int) -> TrainReplies:
        """Take in the screened updates (their sites, their epsilons) and stop the run when a
        budget is spent under ``on_budget_exhausted = "stop"`` or too few updates are valid."""
        updates, rejected, budget_spent = replies.updates, replies.rejected, replies.budget_spent
        self.known_sites |= {u.site for u in updates}
        for site, reasons in sorted(rejected.items()):
            logger.warning("round %d: left out %s: %s", round_number, site, "; ".join(reasons))
        for site in [u.site for u in updates]:
            if "epsilon" in replies.train_metrics[site]:
                self.epsilon[site] = replies.train_metrics[site]["epsilon"]
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
        return replies

    def _aggregate(self, updates: list[SiteUpdate]) -> None:
        """The new global state from the valid updates (and the moving average after it)."""
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

    def _evaluate_sites(self, nodes: list[int], round_number: int) -> dict[str, dict[str, float]]:
        """The sites' scores of the new global model on their validation data (when asked)."""
        if not self.fed.evaluate_sites:
            return {}
        evaluation = self._exchange(nodes, "evaluate", round_number)
        return self.sites.screen_evaluations(evaluation, round_number)

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

    # ------------------------------------------------------------------ records

    def _record(self, summary: RoundSummary) -> None:
        with self._signals.critical():
            self._write_round(summary)
        self.status.set("between rounds", summary.round, f"round {summary.round} complete")

    def _write_round(self, summary: RoundSummary) -> None:
        """The round's checkpoint, ``round.json``, ``best.json``, ``rounds.jsonl`` line and
        scalars (:mod:`fedsynth.server.run_records`), then its line on the terminal."""
        record = round_record(summary, self.config.privacy.delta)
        self.metadata.sites = sorted(set(self.metadata.sites) | set(summary.accepted))
        save_round_checkpoint(
            self.run_dir,
            self.nets,
            self.metadata,
            record,
            ema=self._ema_modules(),
            ema_decay=self.fed.ema_decay,
            server_state=self.aggregator.state_dict(),
        )
        self.best = record_best(self.run_dir, self.best, record)
        append_round_line(self.run_dir, summary)
        self.scalars.write(summary)
        announce_round(summary, self.fed.rounds)

    # ------------------------------------------------------------------ whole run

    def run(self) -> list[RoundSummary]:
        """Run the remaining rounds; return their summaries."""
        summaries = []
        for round_number in range(self.start_round, self.fed.rounds + 1):
            summaries.append(self.run_round(round_number))
        self.scalars.close()
        logger.info("run complete: %s", round_dir(self.run_dir, self.fed.rounds))
        if self.best is not None:
            logger.info("%s: %s", self.best.line, round_dir(self.run_dir, self.best.round))
        self.status.set("finished", self.fed.rounds, f"all {self.fed.rounds} rounds complete")
        return summaries

    # ------------------------------------------------------------------ stopping

    def stop_on_signals(self) -> contextlib.AbstractContextManager[None]:
        """Turn SIGTERM and SIGINT into :class:`CoordinatorInterruptedError` for the duration
        (:meth:`SignalGuard.stop_on_signals`); a signal during a round's writing waits for it."""
        return self._signals.stop_on_signals()

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
