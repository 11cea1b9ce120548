"""common/io.py: crash-safe writes that leave only the target behind, in the mode asked for."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsynth.common.io import AS_OPEN, atomic_write_bytes


def _umask() -> int:
    # Read once, before any writer runs: os.umask can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_as_open_gives_opens_mode_and_leaves_the_umask_from_threads(tmp_path: Path) -> None:
    mask = _umask()
    reference = tmp_path / "reference.bin"
    reference.write_bytes(b"x")  # what open() gives under this umask
    targets = [tmp_path / "sub" / f"file-{i}.nii.gz" for i in range(16)]
    with ThreadPoolExecutor(4) as pool:  # the phantom writes from threads
        list(pool.map(lambda t: atomic_write_bytes(t, t.name.encode(), AS_OPEN), targets))
    assert _umask() == mask
    for target in targets:
        assert target.read_bytes() == target.name.encode()
        assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(t.name for t in targets)


def test_a_write_replaces_an_older_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"a much longer first version", AS_OPEN)
    atomic_write_bytes(target, b"second", AS_OPEN)
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_mode_holds_when_the_writer_makes_the_file_anew(tmp_path: Path) -> None:
    from fedsynth.common.io import READABLE, atomic_save

    def recreate(tmp: Path) -> None:  # some libraries unlink and create their output
        tmp.unlink()
        tmp.write_bytes(b"png")
        tmp.chmod(0o600)

    old = os.umask(0o022)
    try:
        atomic_save(tmp_path / "figure.png", recreate, READABLE)
    finally:
        os.umask(old)
    assert (tmp_path / "figure.png").stat().st_mode & 0o777 == 0o644
