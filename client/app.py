"""The hospital side as a Flower ``ClientApp``: train and evaluate, replying with scalars only.

Each message is handled by :mod:`fedsynth.client.site_round`. A site that cannot take part (no data
for the direction, unusable scans, a broken instruction) replies with a Flower error whose reason
names no path or subject; the full story goes to the site's own log. Unexpected exceptions are
answered the same way rather than left to crash the app process, so the coordinator can log the site
by name. A site whose privacy budget (the consortium's or its own ``--max-epsilon``) would be passed
replies with ``SITE_BUDGET`` so the coordinator can tell a spent budget from a failure.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.audit import record_outgoing
from fedsynth.client.instruction import complete
from fedsynth.client.site_round import evaluate_round, train_round
from fedsynth.client.site_settings import SiteError, SiteSettings
from fedsynth.client.state_store import DiskStore, MemoryStore, StateStore
from fedsynth.common.logs import drop_opacus_root_handler
from fedsynth.common.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    SITE_BUDGET,
    SITE_CRASH,
    SITE_ERROR,
    RoundInstruction,
    from_record,
    metrics_record,
    to_record,
)
from fedsynth.common.privacy.plan import BudgetSpentError

logger = logging.getLogger("fedsynth.client")

STATE_RECORD = "fedsynth-site-state"

app = ClientApp(mods=[record_outgoing])


class ContextStore(MemoryStore):
    """Trainer state kept in a simulated node's ``context.state`` (it lives as long as the run)."""

    def __init__(self, context: Context):
        record = context.state.config_records.get(STATE_RECORD)
        blobs = {k: v for k, v in (record or {}).items() if isinstance(v, bytes)}
        super().__init__(blobs)
        self.context = context

    def save(self, run_key: str, round_number: int, blob: bytes) -> None:
        super().save(run_key, round_number, blob)
        self.context.state[STATE_RECORD] = ConfigRecord(dict(self.blobs))

    def save_config(self, run_key: str, digest: str, text: str) -> None:
        super().save_config(run_key, digest, text)
        self.context.state[STATE_RECORD] = ConfigRecord(dict(self.blobs))


SITE_LOG = "site.log"
_LOGGERS = ("fedsynth.client", "fedsynth.common")  # where this process's messages come from
_FORMAT = "%(asctime)s %(levelname)s fedsynth: %(message)s"


def setup_site_logging(state_dir: Path | None) -> None:
    """Make the ClientApp's messages reach the hospital's operator.

    Flower runs the ClientApp in a fresh process that configures only Flower's own logger, so
    fedsynth's lines (round progress, epsilon, why a round was declined) would go nowhere. They
    go to stderr, which the SuperNode passes on to the daemon's output (``docker logs``), and to
    ``<state-dir>/site.log``, which stays with the site's state. Idempotent; a process that
    serves another state folder (simulation) switches its file.
    """
    drop_opacus_root_handler()  # else every line would reach stderr twice (fedsynth.common.logs)
    formatter = logging.Formatter(_FORMAT)
    for name in _LOGGERS:
        target = logging.getLogger(name)
        target.setLevel(logging.INFO)
        handlers = {type(h): h for h in target.handlers if getattr(h, "fedsynth_site", False)}
        if logging.StreamHandler not in handlers:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(formatter)
            stream.fedsynth_site = True  # type: ignore[attr-defined]
            target.addHandler(stream)
        current = handlers.get(logging.FileHandler)
        wanted = None if state_dir is None else Path(state_dir) / SITE_LOG
        if current is not None and (
            wanted is None or Path(current.baseFilename) != wanted.resolve()  # type: ignore[attr-defined]
        ):
            target.removeHandler(current)
            current.close()
            current = None
        if current is None and wanted is not None:
            wanted.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(wanted, encoding="utf-8")
            file_handler.setFormatter(formatter)
            file_handler.fedsynth_site = True  # type: ignore[attr-defined]
            target.addHandler(file_handler)


def _store(settings: SiteSettings, context: Context) -> StateStore:
    return DiskStore(settings.state_dir) if settings.state_dir else ContextStore(context)


def _refuse(msg: Message, exc: BaseException) -> Message:
    if isinstance(exc, BudgetSpentError):
        logger.warning("declining %s: %s", msg.metadata.message_type, exc)
        return Message(Error(code=SITE_BUDGET, reason=str(exc)), reply_to=msg)
    if isinstance(exc, SiteError):
        logger.error("declining %s: %s", msg.metadata.message_type, exc)
        return Message(Error(code=SITE_ERROR, reason=str(exc)), reply_to=msg)
    logger.error("%s failed:\n%s", msg.metadata.message_type, traceback.format_exc())
    reason = f"{type(exc).__name__} at the site (its log has the details)"
    return Message(Error(code=SITE_CRASH, reason=reason), reply_to=msg)


def _instruction(msg: Message) -> RoundInstruction:
    if CONFIG not in msg.content.config_records or ARRAYS not in msg.content.array_records:
        raise SiteError("the coordinator's message lacks its config or arrays record")
    try:
        return RoundInstruction.from_record(msg.content.config_records[CONFIG])
    except ValueError as exc:
        raise SiteError(str(exc)) from None


def _global_state(msg: Message, instruction: RoundInstruction) -> dict[str, torch.Tensor]:
    try:
        return from_record(msg.content.array_records[ARRAYS], instruction.wire_dtype)
    except ValueError as exc:
        raise SiteError(f"the coordinator's weights cannot be unpacked: {exc}") from None


def _in_order(
    shared: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The reply's entries in the order of the received layout, which the coordinator unpacks by."""
    if set(shared) != set(received):
        raise SiteError("the trained networks' parameters differ from the coordinator's")
    return {key: shared[key] for key in received}


def _received(
    msg: Message, context: Context
) -> tuple[SiteSettings, RoundInstruction, dict[str, torch.Tensor], StateStore]:
    """The site's own settings (its log set up), the coordinator's instruction (completed with
    the run's configuration, :mod:`fedsynth.client.instruction`), its weights, the site's store."""
    settings = SiteSettings.from_configs(context.node_config, context.run_config)
    setup_site_logging(settings.state_dir)
    store = _store(settings, context)
    instruction = complete(_instruction(msg), store)
    return settings, instruction, _global_state(msg, instruction), store


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        settings, instruction, global_state, store = _received(msg, context)
        shared, metrics = train_round(settings, instruction, global_state, store)
        content = RecordDict(
            {
                ARRAYS: to_record(_in_order(shared, global_state), instruction.wire_dtype),
                METRICS: metrics_record(metrics),
            }
        )
        return Message(content, reply_to=msg)
    except Exception as exc:
        return _refuse(msg, exc)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        settings, instruction, global_state, _ = _received(msg, context)
        metrics = evaluate_round(settings, instruction, global_state)
        return Message(RecordDict({METRICS: metrics_record(metrics)}), reply_to=msg)
    except Exception as exc:
        return _refuse(msg, exc)
