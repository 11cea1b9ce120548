"""A digest of an experiment's ``results.json`` without what a rerun may change: how long it took.

Two runs of the same experiment on the same machine must agree on every score, every split,
every epsilon and every byte count; only wall-clock seconds and the machine line may differ.
This prints one SHA-256 over the rest (floats as Python writes them back, i.e. every digit), so
a restructure can show that it left the results as they were::

    python -m benchmarks.results_digest runs/demo/results.json /tmp/before/results.json

With two or more files it also says whether they agree, and where the first difference is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# The keys whose values are wall-clock measurements or describe the machine, at any depth.
TIMING_KEYS = frozenset({"seconds", "train_seconds", "timing", "machine"})


def without_timing(value: Any) -> Any:
    """``value`` with every :data:`TIMING_KEYS` entry removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def canonical(path: Path) -> str:
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    return json.dumps(without_timing(results), sort_keys=True, indent=1)


def digest(path: Path) -> str:
    return hashlib.sha256(canonical(path).encode()).hexdigest()


def first_difference(a: str, b: str) -> str:
    for number, (line_a, line_b) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if line_a != line_b:
            return f"line {number + 1}: {line_a.strip()!r} != {line_b.strip()!r}"
    return "one is a prefix of the other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    args = parser.parse_args(argv)
    texts = {path: canonical(path) for path in args.results}
    for path, text in texts.items():
        print(f"{hashlib.sha256(text.encode()).hexdigest()}  {path}")
    first, *others = args.results
    differing = [path for path in others if texts[path] != texts[first]]
    for path in differing:
        print(f"{path} differs from {first}: {first_difference(texts[first], texts[path])}")
    if others and not differing:
        print(f"all {len(args.results)} agree (timing fields left out: {sorted(TIMING_KEYS)})")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
