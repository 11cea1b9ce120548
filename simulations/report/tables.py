"""Markdown tables and the formatting of numbers and text in them: one rule each for how a
value, a gap, a duration or a missing value is written."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "–"  # what a table shows for a value that is absent or NaN


def _fmt(value: float | None, decimals: int) -> str:
    """A number with ``decimals`` decimals; ``MISSING`` for None or NaN, ∞ for infinity."""
    if value is None or math.isnan(value):
        return MISSING
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{decimals}f}"


def _fmt_delta(value: float) -> str:
    if math.isnan(value):
        return MISSING
    if math.isinf(value):
        return _fmt(value, 2)
    return f"{value:+.2f}"


def _fmt_seconds(seconds: float | None) -> str:
    """Seconds with one decimal below ten seconds, none above."""
    if seconds is None or math.isnan(seconds):
        return MISSING
    return _fmt(seconds, 1 if abs(seconds) < 10 else 0)


def _fmt_mb(n_bytes: float) -> str:
    return _fmt(n_bytes / 1e6, 2)


def _duration(seconds: float) -> str:
    """A human duration for the terminal: ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if math.isnan(seconds):
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _number(value: Any, decimals: int | None = None) -> str:
    """A privacy parameter: compact (``1e-05``) unless ``decimals`` is given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING if value is None else _escape(str(value))
    if decimals is not None:
        return _fmt(float(value), decimals)
    return f"{value:g}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + _kv(value) + "}"
    return str(value)


def _kv(values: Mapping[str, Any]) -> str:
    return _escape(", ".join(f"{key}={_short(value)}" for key, value in values.items()))


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != MISSING else text


def _best_indices(values: Sequence[float], *, higher: bool) -> set[int]:
    """Indices of the best non-NaN value (all of them on a tie); none when fewer than two
    distinct values compete, as there is nothing to single out."""
    candidates = [v for v in values if not math.isnan(v)]
    if len(set(candidates)) < 2:
        return set()
    best = max(candidates) if higher else min(candidates)
    return {index for index, value in enumerate(values) if value == best}


def _escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _link(text: str, target: str) -> str:
    return f"[{_escape(text)}](<{target}>)" if " " in target else f"[{_escape(text)}]({target})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "site"


def _unique(stem: str, used: set[str]) -> str:
    name, counter = stem, 2
    while name in used:
        name, counter = f"{stem}-{counter}", counter + 1
    used.add(name)
    return name


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> list[str]:
    """A Markdown table; ``align`` holds one ``l`` or ``r`` per column.

    Without ``align`` every column is left-aligned under a compact rule (``|---|---|``).
    """
    if align is None:
        rule_line = "|" + "---|" * len(header)
    else:
        rule = ["---:" if a == "r" else "---" for a in align]
        rule_line = "| " + " | ".join(rule) + " |"
    lines = ["| " + " | ".join(header) + " |", rule_line]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
