"""common/io.py: crash-safe writes that leave nothing but the target behind."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedsynth.common.io import atomic_write_bytes_default_mode


def _umask() -> int:
    # Read once, before any writer runs: os.umask can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_default_mode_write_gives_opens_mode_and_leaves_the_umask(tmp_path: Path) -> None:
    mask = _umask()
    reference = tmp_path / "reference.bin"
    reference.write_bytes(b"x")  # what open() gives under this umask
    targets = [tmp_path / "sub" / f"file-{i}.nii.gz" for i in range(16)]
    with ThreadPoolExecutor(4) as pool:  # the phantom writes from threads
        list(pool.map(lambda t: atomic_write_bytes_default_mode(t, t.name.encode()), targets))
    assert _umask() == mask
    for target in targets:
        assert target.read_bytes() == target.name.encode()
        assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(t.name for t in targets)


def test_default_mode_write_replaces_an_older_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_bytes_default_mode(target, b"a much longer first version")
    atomic_write_bytes_default_mode(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
