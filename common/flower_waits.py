"""Shorter waits in Flower's message path, for the processes fedsynth runs in a deployment.

Measured in a real loopback deployment (``benchmarks/bench_federation.py overhead``), most of a
round's transport time was not spent moving bytes but waiting:

- A receiver (a SuperNode, the ClientApp, the ServerApp) learns of a message before all of its
  objects (the weights, in chunks of 5 MB) have arrived, because the sender registers the
  message first and uploads the objects after. Flower's ``pull_objects`` then retries each
  missing object after 1 s, 2 s, 4 s, ... (up to 10 s between tries). The SuperNode creates the
  ClientApp's task before it has pulled the weights from the SuperLink, so the ClientApp always
  starts by waiting: 1.3-7.3 s per message, and as long again on the reply's way back.
- The SuperNode sleeps 3 s between pulls from the SuperLink when it has nothing to do, and
  0.5 s between checks for the ClientApp's reply.

:func:`quick_object_pulls` makes the object retries start at 50 ms and stay under 0.5 s;
:func:`quick_supernode_waits` caps the SuperNode's sleeps at 1 s. Neither changes what is
sent, how often a message is retried in all, or any timeout: a receiver only looks again
sooner. The cost is a few more small requests while a transfer is in flight, and, for an idle
SuperNode, a pull a second instead of one every 3 s; each costs the SuperLink a few SQLite
queries and a signature check, which is why the cap is not lower (0.5 s, tried, saved nothing
measurable and cost the SuperLink more CPU: BENCHMARKS.md).

Flower internals used, pinned with ``flwr==1.42.*`` (tests/common/test_flower_waits.py checks
they are still there): the keyword defaults of ``pull_objects`` and
``pull_and_inflate_object_from_tree`` in ``flwr.supercore.inflatable.inflatable_utils``, and the
module-level ``time`` of ``flwr.supernode.start_client_internal``.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

# First retry and longest wait between retries of an object that has not arrived yet (Flower's
# own: 1 s and 10 s).
OBJECT_RETRY_S = 0.05
OBJECT_RETRY_CAP_S = 0.5
# The longest a SuperNode sleeps between looking for work (Flower's own: 3 s when idle; 0.5 s
# between checks for the ClientApp's reply, which stays as it is).
SUPERNODE_WAIT_CAP_S = 1.0


def quick_object_pulls(first: float = OBJECT_RETRY_S, cap: float = OBJECT_RETRY_CAP_S) -> None:
    """Retry an object that has not arrived yet after ``first`` seconds, doubling up to ``cap``.

    Applies to this process and to processes forked from it afterwards.

    Raises:
        RuntimeError: this Flower no longer has the defaults being tuned (see the module's
            docstring); an upgrade needs this module revisited.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for wrapped in (
        inflatable_utils.pull_objects,
        inflatable_utils.pull_and_inflate_object_from_tree,
    ):
        function = inspect.unwrap(wrapped)  # a decorated function reads the inner defaults
        defaults: dict[str, Any] | None = function.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(
                f"flwr {function.__module__}.{function.__qualname__} has no initial_backoff/"
                "backoff_cap keyword defaults any more: common/flower_waits.py needs updating"
            )
        defaults["initial_backoff"] = first
        defaults["backoff_cap"] = cap


class _CappedSleep:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` is capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def quick_supernode_waits(cap: float = SUPERNODE_WAIT_CAP_S) -> None:
    """Cap every sleep of the SuperNode's main loop at ``cap`` seconds (this process).

    Raises:
        RuntimeError: the SuperNode's loop no longer sleeps through its module-level ``time``.
    """
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(
        getattr(loop, "time", None), _CappedSleep
    ):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer imports the time module: "
            "common/flower_waits.py needs updating"
        )
    loop.time = _CappedSleep(cap)  # type: ignore[assignment]
