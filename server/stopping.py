"""How a coordinator's run ends early: the two errors it raises, and signals held off while a round
is written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class CoordinatorStoppedError(RuntimeError):
    """The run cannot go on (too few sites, too few valid updates); the message says why."""


class CoordinatorInterruptedError(BaseException):
    """SIGTERM or SIGINT reached the coordinator (``docker stop``, systemd, Ctrl-C).

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it. Raised only outside a round's checkpoint writing (see
    :meth:`SignalGuard.stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """Turns SIGTERM and SIGINT into :class:`CoordinatorInterruptedError`, except while a round
    is being written (:meth:`critical`), when the signal waits until the round is complete."""

    def __init__(self) -> None:
        self._writing = False  # inside a round's checkpoint: a signal waits until it is done
        self._deferred_signal: int | None = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
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
