"""The hospital's audit log of what leaves the site: numbers described, never copied."""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsynth.client.audit import describe
from fedsynth.common.messages import ARRAYS, METRICS, to_record


def _messages() -> tuple[Message, Message]:
    # Flower stamps a message with its process's run and task (set by Flower in a real one).
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    state = {"g_ab.w": torch.full((2, 3), 0.123456), "g_ab.n": torch.tensor(7)}
    update = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    incoming = Message(
        RecordDict({ARRAYS: to_record(state, "float32", layout=True), "config": ConfigRecord({})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = Message(
        RecordDict({ARRAYS: to_record(update, "float32"), METRICS: MetricRecord({"loss_g": 0.5})}),
        dst_node_id=0,
        message_type="train",
    )
    return incoming, reply


def test_a_reply_is_described_with_the_parameters_its_numbers_are() -> None:
    incoming, reply = _messages()
    entry = describe(reply, incoming)
    arrays = entry["records"][ARRAYS]
    assert arrays["entries"] == {
        "values": {"dtype": "float32", "shape": [6]},
        "integers": {"dtype": "int64", "shape": [1]},
    }
    assert arrays["packed"] == {
        "g_ab.w": {"dtype": "float32", "shape": [2, 3]},
        "g_ab.n": {"dtype": "int64", "shape": []},
    }
    assert entry["records"][METRICS] == {"kind": "metrics", "entries": {"loss_g": 0.5}}
    text = json.dumps(entry)
    assert "1.123" not in text and "0.123" not in text  # no weight is copied into the log


def test_without_the_answered_message_only_what_was_sent_is_listed() -> None:
    _, reply = _messages()
    assert "packed" not in describe(reply)["records"][ARRAYS]
