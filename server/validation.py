"""Checks every site update must pass before it is aggregated.

An update is a mapping from parameter name to array, decoded to the global model's dtypes. It is
refused, with every reason, when its key set differs from the global model's, a shape or dtype
differs, a value is NaN or infinite, or (optionally) the norm of its change from the global model
exceeds a bound. The coordinator logs the site and the reasons and leaves the update out; the
round goes on while enough sites remain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class UpdateCheck:
    """The verdict on one update: ``ok`` when ``problems`` is empty; ``delta_norm`` if computed."""

    problems: list[str] = field(default_factory=list)
    delta_norm: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _listing(keys: set[str], limit: int = 5) -> str:
    ordered = sorted(keys)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def check_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float | None = None,
) -> UpdateCheck:
    """Compare a site's update with the global model it started from.

    Args:
        update: the site's parameters after local training.
        reference: the global parameters sent to the site this round.
        max_update_norm: refuse updates whose L2 distance from ``reference`` (over all floating
            parameters) exceeds this; ``None`` turns the bound off.
    """
    problems: list[str] = []
    missing = set(reference) - set(update)
    unexpected = set(update) - set(reference)
    if missing:
        problems.append(f"missing parameters: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected parameters: {_listing(unexpected)}")
    squared = 0.0
    for key in sorted(set(reference) & set(update)):
        value, expected = update[key], reference[key]
        if tuple(value.shape) != tuple(expected.shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
            continue
        if value.dtype != expected.dtype:
            problems.append(f"{key}: dtype {value.dtype}, expected {expected.dtype}")
            continue
        if value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                problems.append(f"{key}: {bad} NaN or infinite value(s)")
                continue
            squared += float(torch.sum((value.double() - expected.double()) ** 2))
    norm = math.sqrt(squared) if not problems else None
    if norm is not None and max_update_norm is not None and norm > max_update_norm:
        problems.append(f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}")
    return UpdateCheck(problems, norm)
