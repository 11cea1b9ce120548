"""Shorter waits in Flower's message path: the internals are still there, and the waits shrink."""

from __future__ import annotations

import time
from collections.abc import Iterator

import flwr
import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal

from fedsynth.common.flower_waits import (
    OBJECT_RETRY_CAP_S,
    OBJECT_RETRY_S,
    quick_object_pulls,
    quick_supernode_waits,
)

FUNCTIONS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)


@pytest.fixture
def restored() -> Iterator[None]:
    """Put Flower's own defaults back after the test (they are process-wide)."""
    before = [dict(f.__kwdefaults__ or {}) for f in FUNCTIONS]
    clock = start_client_internal.time
    yield
    for function, defaults in zip(FUNCTIONS, before, strict=True):
        function.__kwdefaults__ = defaults
    start_client_internal.time = clock


def test_the_pinned_flower_has_the_defaults_being_tuned(restored: None) -> None:
    assert flwr.__version__.startswith("1.42."), flwr.__version__  # pyproject.toml's pin
    for function in FUNCTIONS:
        assert function.__kwdefaults__["initial_backoff"] == 1  # Flower's own
    quick_object_pulls()
    for function in FUNCTIONS:
        assert function.__kwdefaults__["initial_backoff"] == OBJECT_RETRY_S
        assert function.__kwdefaults__["backoff_cap"] == OBJECT_RETRY_CAP_S


def test_an_object_that_arrives_late_is_read_soon_after(restored: None) -> None:
    """Two misses, then the object: Flower's defaults wait 1 s + 2 s, the tuned ones 0.15 s."""
    quick_object_pulls()
    misses = {"a": 2}

    def pull(object_id: str) -> bytes:
        if misses[object_id]:
            misses[object_id] -= 1
            raise ObjectUnavailableError(object_id)
        return b"payload"

    start = time.monotonic()
    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"payload"}
    assert time.monotonic() - start < 0.8


def test_the_supernode_sleeps_at_most_the_cap(restored: None) -> None:
    assert start_client_internal.time is time  # the module-level name being replaced
    quick_supernode_waits(cap=0.05)
    start = time.monotonic()
    start_client_internal.time.sleep(3)  # the idle wait between pulls from the SuperLink
    assert time.monotonic() - start < 1.0
    assert abs(start_client_internal.time.time() - time.time()) < 1.0  # the rest is time's
    quick_supernode_waits(cap=0.05)  # a second call is harmless
