"""Errors a hospital can act on: each names the file or folder and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class SiteDataError(ValueError):
    """Base class: something about a site's data folder prevents training or inspection."""


class ScanError(SiteDataError):
    """One scan cannot be used. ``path`` is the file, ``reason`` says what is wrong."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class BadScansError(SiteDataError):
    """Several scans are unusable; raised before training starts unless ``skip_bad`` is set."""

    def __init__(self, errors: Sequence[ScanError]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} unusable scan(s); fix or remove them, or pass --skip-bad "
            f"to continue without them:\n{lines}"
        )


class EmptySiteError(SiteDataError):
    """The folder holds no scans in a layout fedsynth understands."""


class MissingModalityError(SiteDataError):
    """A requested synthesis direction needs a modality the site does not have."""
