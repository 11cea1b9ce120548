"""Opacus' import-time logging.basicConfig must not print every line a second time."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from fedsynth.common.logs import OPACUS_FORMAT, drop_opacus_root_handler


def test_only_the_handler_opacus_installs_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    theirs = logging.StreamHandler(sys.stderr)
    theirs.setFormatter(logging.Formatter(OPACUS_FORMAT, "%m/%d/%Y %H:%M:%S"))
    mine = logging.StreamHandler(sys.stderr)
    mine.setFormatter(logging.Formatter("%(message)s"))
    before = list(root.handlers)
    root.addHandler(theirs)
    root.addHandler(mine)
    assert drop_opacus_root_handler() == 1
    assert root.handlers == [*before, mine]
    assert drop_opacus_root_handler() == 0


def test_the_format_is_the_one_opacus_uses() -> None:
    """Read Opacus' own source, so that an Opacus upgrade that changes it fails here."""
    import opacus.utils.module_utils as module_utils

    source = Path(module_utils.__file__).read_text(encoding="utf-8")
    assert f'format="{OPACUS_FORMAT}"' in source
