"""A record of everything a hospital sends, for the hospital's own privacy audit.

When the node config sets ``audit-log`` to a file, :func:`record_outgoing` (a ClientApp mod, so it
sees the reply after the app produced it, on its way out) appends one JSON line per reply: its
type, its error if any, and for every record the keys with their dtype and shape (arrays), their
value (metrics) or their value's type (anything else). Array contents are never written: the log
shows what left the site without being a copy of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

Handler = Callable[[Message, Context], Message]


def describe(msg: Message) -> dict[str, Any]:
    """A JSON-ready outline of a message: records, keys, dtypes, shapes, metric values."""
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


def record_outgoing(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: pass the message on, then log the reply when ``audit-log`` is set."""
    reply = call_next(msg, context)
    target = context.node_config.get("audit-log")
    if target:
        path = Path(str(target))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(describe(reply), sort_keys=True) + "\n")
    return reply
