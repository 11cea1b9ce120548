"""Configuration errors that name every invalid value, where it came from and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConfigIssue:
    """One invalid value: where it is, what was found, where it came from, what is allowed."""

    key: str
    found: Any
    allowed: str
    source: str | None = None

    def __str__(self) -> str:
        origin = f" (from {self.source})" if self.source else ""
        return f"{self.key} = {self.found!r}{origin}: {self.allowed}"


class ConfigError(ValueError):
    """Raised for an invalid configuration; lists every problem, one per line."""

    def __init__(self, issues: Sequence[ConfigIssue], context: str = "invalid configuration"):
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"{context}:\n{lines}")
