"""Errors a hospital can act on: each names the file or folder and what was expected."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

UNEXPECTED_HINT = (
    "run with -v for the traceback; re-exporting the scan from DICOM usually gives a readable file"
)


class SiteDataError(ValueError):
    """Base class: something about a site's data folder prevents training or inspection."""


class ScanError(SiteDataError):
    """One scan cannot be used. ``path`` is the file, ``reason`` says what is wrong and ``hint``
    (optional, one line) what to do about it."""

    def __init__(self, path: Path, reason: str, hint: str | None = None):
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path}: {reason}" + (f"; {hint}" if hint else ""))


class BadScansError(SiteDataError):
    """Several scans are unusable; raised before training starts unless ``skip_bad`` is set."""

    def __init__(self, errors: Sequence[ScanError]):
        self.errors = list(errors)
        # What may leave the site (the coordinator's log, a report): no path, file or subject.
        self.summary = (
            f"unusable files: {len(self.errors)} scan(s) cannot be used and data.skip_bad is off"
        )
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} unusable scan(s); fix or remove them, or pass --skip-bad "
            f"to continue without them:\n{lines}"
        )


class EmptySiteError(SiteDataError):
    """The folder holds no scans in a layout fedsynth understands."""


class MissingModalityError(SiteDataError):
    """A requested synthesis direction needs a modality the site does not have."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors behind it, outermost first (MONAI wraps a transform's error)."""
    chain = [exc]
    while (inner := exc.__cause__ or exc.__context__) is not None and inner not in chain:
        chain.append(inner)
        exc = inner
    return chain


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (MONAI wraps a transform's error in its own), one line."""
    exc = _chain(exc)[-1]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def scan_failures(path: Path, doing: str = "preprocessing") -> Iterator[None]:
    """Turn any failure while reading or preprocessing one scan into that file's ScanError.

    A scan's own verdicts pass through; anything else (a library's error on a file nobody
    foresaw, running out of memory) becomes a ScanError naming ``path``, with its traceback in
    the debug log (``fedsynth -v``), so one file never takes down a command or a site's round.
    """
    try:
        yield
    except ScanError:
        raise
    except Exception as exc:
        # A MemoryError inside a MONAI Compose arrives wrapped in its RuntimeError.
        if any(isinstance(e, MemoryError) for e in _chain(exc)):
            logger.debug("%s %s ran out of memory", doing, path, exc_info=True)
            raise ScanError(
                path,
                f"ran out of memory while {doing} it",
                hint="lower data.max_voxels, or give this machine more memory",
            ) from None
        logger.debug("%s %s failed", doing, path, exc_info=True)
        raise ScanError(
            path, f"{doing} failed ({_root_cause(exc)})", hint=UNEXPECTED_HINT
        ) from None
