"""benchmarks/results_digest.py: equal digests for reruns that differ in timing only."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from benchmarks.results_digest import digest, main

RESULTS = {
    "name": "demo",
    "models": [
        {"name": "federated", "mean": {"psnr_masked": 21.539079436976568}, "train_seconds": 98.7}
    ],
    "rounds": [{"round": 1, "seconds": 50.2, "bytes_up": 1024}],
    "timing": {"federated": 98.75},
    "machine": "x86_64, 2 torch threads",
}


def _write(path: Path, results: dict[str, object]) -> Path:
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def test_timing_alone_leaves_the_digest_and_a_score_digit_changes_it(tmp_path: Path) -> None:
    before = _write(tmp_path / "a.json", RESULTS)
    slower = copy.deepcopy(RESULTS)
    slower["models"][0]["train_seconds"] = 120.0
    slower["rounds"][0]["seconds"] = 61.0
    slower["timing"] = {"federated": 120.0}
    slower["machine"] = "another machine"
    rerun = _write(tmp_path / "b.json", slower)
    assert digest(before) == digest(rerun)
    assert main([str(before), str(rerun)]) == 0
    last_digit = copy.deepcopy(RESULTS)
    score = RESULTS["models"][0]["mean"]["psnr_masked"]
    last_digit["models"][0]["mean"]["psnr_masked"] = math.nextafter(score, math.inf)
    changed = _write(tmp_path / "c.json", last_digit)
    assert digest(before) != digest(changed)
    assert main([str(before), str(changed)]) == 1
    bytes_moved = copy.deepcopy(RESULTS)
    bytes_moved["rounds"][0]["bytes_up"] = 1025
    assert digest(before) != digest(_write(tmp_path / "d.json", bytes_moved))
