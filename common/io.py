"""Crash-safe file writing: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

READABLE = 0o644  # reports and figures others may read (the umask still applies)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(target: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    A crash or an exception inside the block leaves ``target`` as it was (or absent) and removes
    the temporary file, so readers never see half a file. The file is private to its owner
    (0600, as ``mkstemp`` makes it: right for states and keys) unless ``mode`` is given, e.g.
    :data:`READABLE` for a report; the process umask is applied to ``mode``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffixes (.nii.gz) so libraries that dispatch on the name still work.
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        if mode is not None:
            tmp.chmod(mode & ~_umask())
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


def atomic_write_bytes_default_mode(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, with the mode ``open(target, "wb")`` would give.

    That is ``0666`` less the process umask, as for any file ``open()`` creates, where the
    helpers above make private files (0600) unless given a mode. It never reads or changes the
    umask (``os.umask`` is process-wide), so worker threads may call it concurrently.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
