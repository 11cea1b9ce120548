"""A record of everything a hospital sends, for the hospital's own privacy audit.

When the node config sets ``audit-log`` to a file, :func:`record_outgoing` (a ClientApp mod, so it
sees the reply after the app produced it, on its way out) appends one JSON line per reply: its
type, its error if any, and for every record the keys with their dtype and shape (arrays), their
value (metrics) or their value's type (anything else). Array contents are never written: the log
shows what left the site without being a copy of it.

Weights travel packed (:mod:`fedsynth.common.wire`): the reply's arrays are one vector of numbers
(and one of integers, if the networks have integer buffers), with no names. The log adds, under
``packed``, which parameters those numbers are, with their shapes and dtypes, from the layout of the
coordinator's message the reply answers (the site packs in that order).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedsynth.common.wire import LAYOUT, Slot, read_layout

Handler = Callable[[Message, Context], Message]


def describe(msg: Message, answered: Message | None = None) -> dict[str, Any]:
    """A JSON-ready outline of a message: records, keys, dtypes, shapes, metric values.

    ``answered``: the message ``msg`` replies to; its layout names the packed parameters.
    """
    entry: dict[str, Any] = {"type": msg.metadata.message_type, "time": time.time()}
    if msg.has_error():
        entry["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return entry
    records: dict[str, Any] = {}
    for name, record in msg.content.array_records.items():
        records[name] = {
            "kind": "arrays",
            "entries": {
                key: {"dtype": str(record[key].dtype), "shape": list(record[key].shape)}
                for key in record
            },
        }
        packed = _layout(answered, name)
        if packed is not None:
            records[name]["packed"] = {
                slot.key: {"dtype": slot.dtype, "shape": list(slot.shape)} for slot in packed
            }
    for name, metrics in msg.content.metric_records.items():
        records[name] = {
            "kind": "metrics",
            "entries": {
                key: value if isinstance(value, int | float) else f"<{type(value).__name__}>"
                for key, value in metrics.items()
            },
        }
    for name, config in msg.content.config_records.items():
        records[name] = {
            "kind": "config",
            "entries": {key: f"<{type(value).__name__}>" for key, value in config.items()},
        }
    entry["records"] = records
    return entry


def _layout(message: Message | None, name: str) -> list[Slot] | None:
    """The layout the coordinator sent in record ``name`` of ``message``, if it has one."""
    if message is None or message.has_error() or name not in message.content.array_records:
        return None
    record = message.content.array_records[name]
    if LAYOUT not in record:
        return None
    try:
        return read_layout({LAYOUT: record[LAYOUT].numpy()})
    except ValueError:
        return None


def record_outgoing(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: pass the message on, then log the reply when ``audit-log`` is set."""
    reply = call_next(msg, context)
    target = context.node_config.get("audit-log")
    if target:
        path = Path(str(target))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(describe(reply, msg), sort_keys=True) + "\n")
    return reply
