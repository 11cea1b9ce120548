"""Fixtures shared by the coordinator's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.simulations.engines.inprocess import phantom_sites


@pytest.fixture(scope="session")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three phantom hospitals of 3, 2 and 1 subjects, made once: tests only read them."""
    return phantom_sites(tmp_path_factory.mktemp("consortium"))
