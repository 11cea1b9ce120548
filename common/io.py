"""Crash-safe file writing: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

READABLE = 0o644  # reports and figures others may read (the umask still applies)


PRIVATE = 0o600  # states and keys: the owner only
AS_OPEN = 0o666  # what open() gives a new file (the umask still applies)


def _create_beside(target: Path, mode: int) -> Path:
    """A new, empty temporary file beside ``target``, created with ``mode`` less the umask.

    The kernel applies the umask at creation, so nothing reads or changes the process-wide
    umask and writers on several threads may run at once.
    """
    # Keep the real suffixes (.nii.gz) so libraries that dispatch on the name still work.
    suffix = "".join(target.suffixes)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(target: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    A crash or an exception inside the block leaves ``target`` as it was (or absent) and removes
    the temporary file, so readers never see half a file. The file is private to its owner
    (:data:`PRIVATE`: right for states and keys) unless ``mode`` is given, e.g. :data:`READABLE`
    for a report or :data:`AS_OPEN`; the process umask is applied to ``mode``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(target, PRIVATE if mode is None else mode)
    created = tmp.stat().st_mode & 0o777  # the mode less the umask
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(created)  # in case the writer made the file anew
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"), mode)


def atomic_save(target: Path, save: Callable[[Path], None], mode: int | None = None) -> None:
    """Call ``save(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target, mode) as tmp:
        save(tmp)
