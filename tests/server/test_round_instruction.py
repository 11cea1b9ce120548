"""A lean round instruction: the run's configuration travels to a site until it holds it.

Checked on the messages the coordinator actually sends over an in-process transport double:
every message names the configuration by the SHA-256 of the run folder's resolved TOML, and
carries the TOML itself exactly when the site has not yet replied without error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message

from fedsynth.common.config import RESOLVED_CONFIG_NAME
from fedsynth.common.messages import CONFIG, SITE_ERROR
from fedsynth.server.coordinator import Coordinator
from fedsynth.simulations.engines.inprocess import InProcessGrid, tiny_config

LEAN_KEYS = {"round", "lr", "run-key", "config-digest"}


def _nodes(sites: list[Path], tmp: Path) -> dict[int, dict[str, str]]:
    return {
        i: {"data-dir": str(site), "state-dir": str(tmp / f"state-{i}")}
        for i, site in enumerate(sites, start=1)
    }


class ForgetfulGrid(InProcessGrid):
    """Wipes what one node kept of the configuration just before its round-2 train message."""

    def __init__(self, nodes: dict[int, dict[str, str]], forget: int):
        super().__init__(nodes, names={n: f"site-{n}" for n in nodes})
        self.forget = forget
        self.state_dir = Path(nodes[forget]["state-dir"])

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:
            meta = message.metadata
            if meta.group_id == "train-2" and meta.dst_node_id == self.forget:
                kept = list(self.state_dir.rglob("config-*.toml"))
                assert kept, "the site kept no configuration in round 1"
                for path in kept:
                    path.unlink()
        return super().push_messages(messages)


def _check_config_travels_until_held(grid: InProcessGrid, text: str) -> dict[int, list[bool]]:
    """Per node, whether each message carried the TOML; asserts the rule on every message."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    replies: dict[int, list[Message]] = {}
    for node, reply in grid.replies:
        replies.setdefault(node, []).append(reply)
    carried: dict[int, list[bool]] = {}
    for message in grid.sent:
        node = message.metadata.dst_node_id
        record = dict(message.content.config_records[CONFIG])
        assert record["config-digest"] == digest
        earlier = carried.setdefault(node, [])
        previous_failed = bool(earlier) and replies[node][len(earlier) - 1].has_error()
        expected = not earlier or previous_failed
        assert ("run-config" in record) == expected, (node, len(earlier), record.keys())
        if expected:
            assert record["run-config"] == text
        else:
            assert set(record) == LEAN_KEYS
        earlier.append(expected)
    return carried


def test_the_configuration_travels_once_per_site_then_by_digest(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config("federation.rounds=2", "federation.min_sites=3")
    grid = InProcessGrid(_nodes(sites, tmp_path), names={1: "a", 2: "b", 3: "c"})
    Coordinator(grid, config, tmp_path / "run").run()
    text = (tmp_path / "run" / RESOLVED_CONFIG_NAME).read_text(encoding="utf-8")
    carried = _check_config_travels_until_held(grid, text)
    assert not any(r.has_error() for _, r in grid.replies)
    for node in (1, 2, 3):
        assert carried[node][0] and not any(carried[node][1:]), carried
        assert len(carried[node]) >= 2  # a train message in each round, at least
        assert list((tmp_path / f"state-{node}").rglob("config-*.toml"))


def test_a_site_that_lost_its_configuration_declines_once_and_gets_it_again(
    sites: list[Path], tmp_path: Path
) -> None:
    config = tiny_config("federation.rounds=3", "federation.min_sites=2")
    grid = ForgetfulGrid(_nodes(sites, tmp_path), forget=2)
    summaries = Coordinator(grid, config, tmp_path / "run").run()
    text = (tmp_path / "run" / RESOLVED_CONFIG_NAME).read_text(encoding="utf-8")
    carried = _check_config_travels_until_held(grid, text)
    failed = [r for n, r in grid.replies if r.has_error()]
    assert [r.error.code for r in failed] == [SITE_ERROR]
    assert "holds no configuration" in failed[0].error.reason
    assert "site-2" in summaries[1].rejected
    assert sum(carried[2]) == 2 and sum(carried[1]) == sum(carried[3]) == 1
    assert "site-2" in summaries[2].accepted
