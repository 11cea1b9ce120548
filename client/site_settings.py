"""What a hospital decides for itself (its node config), and the error a site answers with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.common.data.misalign import SEVERITIES as MISALIGNMENT_LEVELS

FAULTS = ("nan", "shape")


class SiteError(Exception):
    """A site cannot take part in this round. ``str(error)`` is safe to send to the coordinator:
    it names no path, file or subject (the site's own log has those)."""


@dataclass(frozen=True)
class SiteSettings:
    """What the hospital decides for itself (SuperNode ``--node-config``).

    Attributes:
        data_dir: the site's BIDS (or per-modality) folder.
        device: ``cuda:0``, ``cpu`` or ``auto``; overrides the coordinator's ``training.device``.
        state_dir: where the site's own networks, optimisers and RNG states live between rounds
            (``None``: in the Flower context, simulation only).
        cache_dir: preprocessed-slice cache (default ``state_dir/cache``).
        fault: testing only, ``nan`` or ``shape``: corrupt the update to exercise the
            coordinator's checks.
        partition_id: simulation only, the index of this site in the run's site list.
        max_epsilon: the hospital's own privacy cap (``--max-epsilon``): it trains only under
            DP-SGD at the site (patient or slice level) and never past this epsilon, whatever
            the coordinator's config says.
        misalignment: simulation only, this simulated site's misalignment of domain B (run
            config ``site-misalignment``, one level per site), in place of the coordinator's.
        threads: simulation only, torch threads for this site (its Ray CPU share).
        skip_bad: the hospital's own ``--skip-bad``: train without its unusable scans, whatever
            the coordinator's ``data.skip_bad``.
    """

    data_dir: Path
    device: str | None = None
    state_dir: Path | None = None
    cache_dir: Path | None = None
    fault: str | None = None
    partition_id: int | None = None
    max_epsilon: float | None = None
    misalignment: str | None = None
    threads: int | None = None
    skip_bad: bool = False

    @classmethod
    def from_configs(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> SiteSettings:
        """Read the node config (deployment) or pick this partition's site (simulation)."""

        def text(key: str, source: Mapping[str, Any] = node_config) -> str | None:
            value = source.get(key)
            return str(value) if value not in (None, "") else None

        partition = node_config.get("partition-id")
        if text("data-dir") is not None:
            data_dir = Path(str(text("data-dir")))
        elif partition is not None and text("site-dirs", run_config):
            sites = [s for s in str(run_config["site-dirs"]).split(",") if s]
            if not 0 <= int(partition) < len(sites):
                raise SiteError(f"partition {partition} has no site ({len(sites)} listed)")
            data_dir = Path(sites[int(partition)])
        else:
            raise SiteError("this node has no data-dir in its node config")
        state = text("state-dir")
        if state is None and partition is not None and text("state-root", run_config):
            state = str(Path(str(run_config["state-root"])) / f"site-{int(partition)}")
        fault = text("fault")
        if fault is not None and fault not in FAULTS:
            raise SiteError(f"node config fault={fault!r}: expected one of {', '.join(FAULTS)}")
        cache = text("cache-dir") or text("cache-dir", run_config)
        misalignment = threads = None
        if partition is not None and text("site-misalignment", run_config):
            levels = str(run_config["site-misalignment"]).split(",")
            misalignment = levels[int(partition)] if int(partition) < len(levels) else None
            if misalignment not in (None, *MISALIGNMENT_LEVELS):
                raise SiteError(f"site-misalignment {misalignment!r}: not a misalignment level")
        if partition is not None and int(run_config.get("cpus-per-site") or 0) > 0:
            threads = int(run_config["cpus-per-site"])
        cap = text("max-epsilon")
        try:
            max_epsilon = float(cap) if cap is not None else None
        except ValueError:
            raise SiteError(f"node config max-epsilon={cap!r}: expected a number") from None
        return cls(
            data_dir=data_dir,
            device=text("device"),
            state_dir=Path(state) if state else None,
            cache_dir=Path(cache) if cache else (Path(state) / "cache" if state else None),
            fault=fault,
            partition_id=int(partition) if partition is not None else None,
            max_epsilon=max_epsilon,
            misalignment=misalignment,
            threads=threads,
            skip_bad=str(node_config.get("skip-bad", "")).lower() in ("1", "true", "yes"),
        )
