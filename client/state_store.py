"""Where a site keeps its trainer state between rounds: on disk, or in memory (simulation).

A site keeps one state per round it trained (the last three), so that a coordinator that crashed
mid-round and resumed from the previous round finds the state that round started from. It also
keeps the run's configuration, by digest, once the coordinator has sent it
(:mod:`fedsynth.client.instruction`), so later instructions need not carry it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from fedsynth.common.io import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

KEEP_STATES = 3


class StateStore(Protocol):
    """Where a site keeps its trainer state between rounds (bytes written by ``torch.save``)."""

    def load(self, run_key: str, before_round: int) -> bytes | None: ...

    def save(self, run_key: str, round_number: int, blob: bytes) -> None: ...

    def load_config(self, run_key: str, digest: str) -> str | None: ...

    def save_config(self, run_key: str, digest: str, text: str) -> None: ...


class DiskStore:
    """``<state_dir>/<run_key>/state-round-NNNN.pt``, written atomically, the last few kept; the
    run's configuration beside them as ``config-<digest>.toml``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _files(self, run_key: str) -> dict[int, Path]:
        folder = self.root / run_key
        found = {}
        for path in folder.glob("state-round-*.pt"):
            suffix = path.stem.rsplit("-", 1)[-1]
            if suffix.isdigit():
                found[int(suffix)] = path
        return found

    def load(self, run_key: str, before_round: int) -> bytes | None:
        earlier = {r: p for r, p in self._files(run_key).items() if r < before_round}
        return earlier[max(earlier)].read_bytes() if earlier else None

    def save(self, run_key: str, round_number: int, blob: bytes) -> None:
        folder = self.root / run_key
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"state-round-{round_number:04d}.pt") as tmp:
            Path(tmp).write_bytes(blob)
        for number, path in sorted(self._files(run_key).items())[:-KEEP_STATES]:
            path.unlink(missing_ok=True)
            logger.debug("dropped old state of round %d", number)

    def load_config(self, run_key: str, digest: str) -> str | None:
        path = self.root / run_key / f"config-{digest}.toml"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def save_config(self, run_key: str, digest: str, text: str) -> None:
        atomic_write_text(self.root / run_key / f"config-{digest}.toml", text)


class MemoryStore:
    """A dict of bytes (the Flower ``context.state`` of a simulated node wraps one)."""

    def __init__(self, blobs: dict[str, bytes] | None = None):
        self.blobs: dict[str, bytes] = {} if blobs is None else blobs

    def load(self, run_key: str, before_round: int) -> bytes | None:
        rounds = [
            int(k.rsplit("-", 1)[-1])
            for k in self.blobs
            if k.startswith(f"{run_key}/round-") and int(k.rsplit("-", 1)[-1]) < before_round
        ]
        return self.blobs[f"{run_key}/round-{max(rounds)}"] if rounds else None

    def save(self, run_key: str, round_number: int, blob: bytes) -> None:
        self.blobs[f"{run_key}/round-{round_number}"] = blob
        mine = sorted(
            (int(k.rsplit("-", 1)[-1]), k) for k in self.blobs if k.startswith(f"{run_key}/")
        )
        for _, key in mine[:-KEEP_STATES]:
            del self.blobs[key]

    def load_config(self, run_key: str, digest: str) -> str | None:
        blob = self.blobs.get(f"config/{run_key}/{digest}")
        return None if blob is None else blob.decode("utf-8")

    def save_config(self, run_key: str, digest: str, text: str) -> None:
        self.blobs[f"config/{run_key}/{digest}"] = text.encode("utf-8")
