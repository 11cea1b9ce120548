"""What a coordinator is doing, for operators: ``status.json`` (live) and ``fedsynth status``.

The coordinator rewrites ``<run>/status.json`` atomically whenever what it is doing changes:
waiting for sites, training round *k* (and which sites it still waits for), evaluating, between
rounds, finished, stopped (with the reason) or interrupted (SIGTERM, Ctrl-C). ``read_status``
joins that file with the history the run folder already keeps (``rounds.jsonl``, ``latest``,
``STOPPED``, ``config.resolved.toml``, ``best.json``) into one :class:`RunStatus`: the current
round, the best round so far, the sites seen, each site's last metrics and cumulative epsilon,
every rejected update and the time per round. It reads files only, so it works on a live run
(the coordinator never holds them open half-written) and on one that ended long ago.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsynth.common.config import RESOLVED_CONFIG_NAME, ConfigError, RunConfig, load_config
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.server.round_store import latest_round, read_best

logger = logging.getLogger("fedsynth.server")

STATUS_FILE = "status.json"
ROUNDS_LOG = "rounds.jsonl"
STOPPED_FILE = "STOPPED"

# What the coordinator can be doing. "finished", "stopped" and "interrupted" are final.
STATES = ("starting", "waiting", "training", "evaluating", "between rounds", "finished", "stopped",
          "interrupted")  # fmt: skip
FINAL_STATES = ("finished", "stopped", "interrupted")


@dataclass
class LiveState:
    """The content of ``status.json``."""

    state: str
    round: int | None
    rounds: int
    detail: str = ""
    online: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    since: float = 0.0  # when this state (and round) began, seconds since the epoch
    updated: float = 0.0
    pid: int = 0  # the coordinator process (the ServerApp), on the coordinator's machine
    host: str = ""


class StatusWriter:
    """Writes ``status.json`` when the state, round, detail or site lists change."""

    def __init__(self, run_dir: Path, rounds: int):
        self.path = Path(run_dir) / STATUS_FILE
        self.rounds = rounds
        self.current: LiveState | None = None

    def set(
        self,
        state: str,
        round_number: int | None = None,
        detail: str = "",
        online: Sequence[str] = (),
        waiting_for: Sequence[str] = (),
    ) -> None:
        if state not in STATES:
            raise ValueError(f"unknown coordinator state {state!r}; expected one of {STATES}")
        now = time.time()
        previous = self.current
        if previous is not None and (
            (previous.state, previous.round, previous.detail, previous.online, previous.waiting_for)
            == (state, round_number, detail, sorted(online), sorted(waiting_for))
        ):
            return
        same_phase = (
            previous is not None and previous.state == state and previous.round == round_number
        )
        self.current = LiveState(
            state=state,
            round=round_number,
            rounds=self.rounds,
            detail=detail,
            online=sorted(online),
            waiting_for=sorted(waiting_for),
            since=previous.since if same_phase and previous is not None else now,
            updated=now,
            pid=os.getpid(),
            host=os.uname().nodename,
        )
        try:
            atomic_write_text(
                self.path, json.dumps(asdict(self.current), indent=1) + "\n", mode=READABLE
            )
        except OSError as exc:  # a full disk must not stop the federation; the log still has it
            logger.warning("could not write %s: %s", self.path, exc)


# ----------------------------------------------------------------------------- reading


@dataclass
class SiteStatus:
    name: str
    rounds_accepted: int = 0
    last_round: int | None = None  # the last round the site was asked to train in
    last_accepted: int | None = None
    train: dict[str, float] = field(default_factory=dict)  # from its last accepted update
    evaluation: dict[str, float] = field(default_factory=dict)  # its last paired evaluation
    epsilon: float | None = None  # cumulative, as last reported
    rejections: int = 0
    last_rejection: str | None = None  # "round k: reason; reason"


@dataclass
class Rejection:
    round: int
    site: str
    reasons: list[str]


@dataclass
class RunStatus:
    run_dir: str
    direction: str
    strategy: str
    rounds: int
    completed: int  # the last complete round (0: none yet)
    state: str
    round: int | None
    detail: str
    since: float | None
    updated: float | None
    running: bool | None  # is the coordinator process alive? None: cannot tell from here
    online: list[str]  # sites connected when the coordinator last looked (live runs)
    waiting_for: list[str]  # sites whose reply (or return) the coordinator is waiting for
    stopped_reason: str | None
    round_seconds: list[float]
    rejected: list[Rejection]
    sites: list[SiteStatus]
    delta: float | None
    notes: list[str] = field(default_factory=list)  # problems met while reading
    privacy_unit: str | None = None  # what one epsilon protects: "patient", "example", "site"
    best_round: int | None = (
        None  # the best round so far (fedsynth.server.round_store), None: unscored
    )
    best_score: float | None = None  # its selection score, dB
    best_metric: str | None = None  # e.g. "eval/psnr_masked"
    best_source: str | None = None  # what was scored, in words

    @property
    def best_line(self) -> str | None:
        """``best round 3 (24.10 dB on the sites' validation data)``, or None."""
        if self.best_round is None or self.best_score is None:
            return None
        return f"best round {self.best_round} ({self.best_score:.2f} dB on {self.best_source})"

    @property
    def median_round_seconds(self) -> float | None:
        return statistics.median(self.round_seconds) if self.round_seconds else None

    @property
    def remaining_seconds(self) -> float | None:
        median = self.median_round_seconds
        if median is None or self.state in FINAL_STATES:
            return None
        return median * max(self.rounds - self.completed, 0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_round_seconds"] = self.median_round_seconds
        out["remaining_seconds"] = self.remaining_seconds
        out["best_line"] = self.best_line
        return out


def process_alive(pid: int, host: str = "") -> bool | None:
    """Is ``pid`` running? None when that cannot be told from here (no pid, another host)."""
    if pid <= 0 or (host and host != os.uname().nodename):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it belongs to another user
    return True


def _read_rounds(path: Path, notes: list[str]) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["round"])] = record  # a repeated round (after a resume): last wins
        except (ValueError, KeyError, TypeError) as exc:
            notes.append(f"{path} line {number}: unreadable record ({exc}); skipped")
    return records


@dataclass
class _Activity:
    """What the coordinator is doing, as far as the files tell (``status.json``, ``STOPPED``)."""

    state: str
    round: int | None = None
    detail: str = ""
    since: float | None = None
    updated: float | None = None
    running: bool | None = None
    online: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)


def _read_config(run_dir: Path) -> RunConfig:
    config_path = run_dir / RESOLVED_CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(
            f"{run_dir}: no {RESOLVED_CONFIG_NAME}; expected the --run-dir of `fedsynth server` "
            "(or the federated/ folder of a `fedsynth simulate` experiment)"
        )
    try:
        return load_config(config_path, environ={})
    except ConfigError as exc:
        raise ValueError(f"{config_path}: {exc}") from None


def _read_live(run_dir: Path, notes: list[str]) -> LiveState | None:
    status_path = run_dir / STATUS_FILE
    if status_path.exists():
        try:
            return LiveState(**json.loads(status_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            notes.append(f"{status_path}: unreadable ({exc})")
    return None


def _activity(
    live: LiveState | None, completed: int, rounds: int, stopped: str | None
) -> _Activity:
    """The live state, or (without ``status.json``) what the run folder implies; a coordinator
    that is no longer running reads as interrupted."""
    if live is None:  # a run from before status.json, or one that never started its coordinator
        finished = completed >= rounds
        return _Activity("finished" if finished else ("stopped" if stopped else "unknown"))
    now = _Activity(
        live.state,
        live.round,
        live.detail,
        live.since,
        live.updated,
        process_alive(live.pid, live.host),
        list(live.online),
        list(live.waiting_for),
    )
    if now.state not in FINAL_STATES and now.running is False:
        now.state, now.detail = (
            "interrupted",
            (
                f"the coordinator (pid {live.pid}) is not running; it was {live.state}"
                + (f" in round {live.round}" if live.round else "")
            ),
        )
    return now


def _sites_and_rejections(
    records: dict[int, dict[str, Any]],
) -> tuple[dict[str, SiteStatus], list[Rejection]]:
    """Each site's history and every rejected update, from ``rounds.jsonl`` in round order."""
    sites: dict[str, SiteStatus] = {}
    rejected: list[Rejection] = []
    for number in sorted(records):
        record = records[number]
        for name in record.get("sites", []):
            sites.setdefault(name, SiteStatus(name)).last_round = number
        for name, metrics in record.get("train_metrics", {}).items():
            site = sites.setdefault(name, SiteStatus(name))
            site.rounds_accepted += 1
            site.last_accepted = number
            site.train = dict(metrics)
        for name, metrics in record.get("eval_metrics", {}).items():
            sites.setdefault(name, SiteStatus(name)).evaluation = dict(metrics)
        for name, epsilon in record.get("epsilon", {}).items():
            sites.setdefault(name, SiteStatus(name)).epsilon = float(epsilon)
        for name, reasons in sorted(record.get("rejected", {}).items()):
            site = sites.setdefault(name, SiteStatus(name))
            site.rejections += 1
            site.last_rejection = f"round {number}: {'; '.join(reasons)}"
            rejected.append(Rejection(number, name, list(reasons)))
    return sites, rejected


def read_status(run_dir: Path) -> RunStatus:
    """The state of the run in ``run_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a coordinator's run folder.
        ValueError: its configuration cannot be read.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    notes: list[str] = []
    records = _read_rounds(run_dir / ROUNDS_LOG, notes)
    try:
        completed = latest_round(run_dir) or 0
    except ValueError as exc:
        notes.append(str(exc))
        completed = max(records, default=0)
    live = _read_live(run_dir, notes)
    stopped_path = run_dir / STOPPED_FILE
    stopped = stopped_path.read_text(encoding="utf-8").strip() if stopped_path.exists() else None
    rounds = config.federation.rounds
    now = _activity(live, completed, rounds, stopped)
    best = None
    try:
        best = read_best(run_dir)
    except (OSError, ValueError, TypeError) as exc:
        notes.append(f"best round: unreadable ({exc})")
    if stopped and now.state not in ("stopped", "interrupted"):
        now.state = "stopped"
    if now.state == "stopped" and stopped:
        now.detail = stopped
    sites, rejected = _sites_and_rejections(records)
    return RunStatus(
        run_dir=str(run_dir),
        direction=config.data.direction,
        strategy=config.federation.strategy,
        rounds=rounds,
        completed=completed,
        state=now.state,
        round=now.round,
        detail=now.detail,
        since=now.since,
        updated=now.updated,
        running=now.running,
        online=now.online if now.state not in FINAL_STATES else [],
        waiting_for=now.waiting_for if now.state not in FINAL_STATES else [],
        stopped_reason=stopped,
        round_seconds=[float(records[n].get("seconds", 0.0)) for n in sorted(records)],
        rejected=rejected,
        sites=[sites[name] for name in sorted(sites)],
        delta=config.privacy.delta if config.privacy.enabled else None,
        privacy_unit=config.privacy.level if config.privacy.enabled else None,
        notes=notes,
        best_round=best.round if best is not None else None,
        best_score=best.score if best is not None else None,
        best_metric=best.metric if best is not None else None,
        best_source=best.source if best is not None else None,
    )
