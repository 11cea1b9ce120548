"""The error a simulated experiment stops with, its message saying what to change."""

from __future__ import annotations


class ExperimentError(RuntimeError):
    """The experiment cannot go on; the message says what to change."""
