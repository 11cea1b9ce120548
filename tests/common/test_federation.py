"""The content rule for site replies, and network state on the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fedsynth.common.messages import (
    ARRAYS,
    METRICS,
    apply_update,
    audit_reply,
    flatten,
    from_record,
    record_bytes,
    to_record,
    unflatten,
    update_from,
)

EXPECTED = {
    "g_ab.w": torch.zeros(8, 1, 3, 3),
    "g_ab.b": torch.zeros(8),
    "g_ab.n": torch.zeros((), dtype=torch.int64),
}


def _reply(state: dict[str, torch.Tensor] | None = None, **extra: object) -> RecordDict:
    arrays = to_record(EXPECTED if state is None else state, "float32")
    records: dict[str, object] = {ARRAYS: arrays, METRICS: MetricRecord({"num-examples": 12})}
    records.update(extra)
    return RecordDict(records)  # type: ignore[arg-type]


def test_a_well_formed_reply_passes() -> None:
    assert audit_reply(_reply(), kind="train", expected=EXPECTED) == []
    # Packed: a few arrays whatever the number of parameters, numbers only.
    assert set(_reply().array_records[ARRAYS].keys()) == {"values", "integers"}


def test_text_records_and_unknown_metrics_are_refused() -> None:
    bad = _reply(notes=ConfigRecord({"subject": "sub-007"}))
    problems = audit_reply(bad, kind="train", expected=EXPECTED)
    assert any("config record" in p for p in problems)
    assert any("unexpected records: notes" in p for p in problems)
    extra_metric = _reply()
    extra_metric.metric_records[METRICS]["subject-age"] = 54
    problems = audit_reply(extra_metric, kind="train", expected=EXPECTED)
    assert problems == ["metrics outside the whitelist: subject-age"]
    # A layout is text (names): the coordinator sends one, a site never does.
    texty = RecordDict(
        {
            ARRAYS: to_record(EXPECTED, "float32", layout=True),
            METRICS: MetricRecord({"num-examples": 1}),
        }
    )
    assert audit_reply(texty, kind="train", expected=EXPECTED) == [
        "carries a layout: a site sends numbers only"
    ]


def test_image_shaped_or_unexpected_arrays_are_refused() -> None:
    reply = _reply()
    reply.array_records[ARRAYS]["slice"] = Array(np.zeros((1, 1, 64, 64, 1), dtype=np.float32))
    problems = audit_reply(reply, kind="train", expected=EXPECTED)
    assert any("unexpected keys: slice" in p for p in problems)
    assert any("5 dimensions" in p for p in problems)
    short = dict(EXPECTED, **{"g_ab.w": torch.zeros(8, 1, 3, 2)})
    assert audit_reply(_reply(short), kind="train", expected=EXPECTED) == [
        "'values' has 56 numbers, the shapes of the shared parameters 80"
    ]
    no_ints = {k: v for k, v in EXPECTED.items() if v.is_floating_point()}
    assert audit_reply(_reply(no_ints), kind="train", expected=EXPECTED) == ["no 'integers' array"]
    half = RecordDict(
        {ARRAYS: to_record(EXPECTED, "float16"), METRICS: MetricRecord({"num-examples": 1})}
    )
    assert audit_reply(half, kind="train", expected=EXPECTED, wire_dtype="float16") == []
    assert audit_reply(half, kind="train", expected=EXPECTED) == [
        "'values' is float16 with 1 dimension(s), expected 1-D float32"
    ]


def test_evaluate_replies_carry_metrics_only() -> None:
    assert (
        audit_reply(
            RecordDict({METRICS: MetricRecord({"psnr": 20.0})}), kind="evaluate", expected=None
        )
        == []
    )
    assert audit_reply(_reply(), kind="evaluate", expected=None) == ["unexpected records: arrays"]


@pytest.mark.parametrize(
    ("dtype", "bytes_per_value"), [("float32", 4), ("float16", 2), ("bfloat16", 2)]
)
def test_state_round_trips_through_a_record(dtype: str, bytes_per_value: int) -> None:
    nets = {"g_ab": torch.nn.Conv2d(1, 4, 3), "g_ba": torch.nn.Conv2d(1, 4, 3)}
    state = flatten(nets, ["g_ab", "g_ba"])
    assert set(state) == {"g_ab.weight", "g_ab.bias", "g_ba.weight", "g_ba.bias"}
    record = to_record(state, dtype, layout=True)
    values = sum(v.numel() for v in state.values())
    assert record_bytes(record) == values * bytes_per_value
    back = from_record(record, dtype)
    tolerance = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    for key, value in state.items():
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], value, atol=tolerance, rtol=tolerance)
    assert set(unflatten(back)) == {"g_ab", "g_ba"}


def test_updates_survive_half_precision_where_weights_would_not() -> None:
    """A step of 1e-4 on weights near 1: bfloat16 keeps it as an update, loses it as a weight."""
    received = {"g_ab.w": torch.full((1000,), 1.0) + torch.rand(1000) * 0.01}
    step = torch.full((1000,), 1e-4)
    trained = {"g_ab.w": received["g_ab.w"] + step}
    update = update_from(trained, received)
    for dtype in ("float16", "bfloat16"):
        via_update = apply_update(received, from_record(to_record(update, dtype), dtype, received))
        via_weights = from_record(to_record(trained, dtype, layout=True), dtype)
        # Per-weight error of the step the coordinator sees.
        error_update = (via_update["g_ab.w"] - trained["g_ab.w"]).abs().mean()
        error_weights = (via_weights["g_ab.w"] - trained["g_ab.w"]).abs().mean()
        assert float(error_update) < 1e-6  # under 1 % of the step
        assert float(error_weights) > 5e-5  # rounding the weight swamps the step


def test_a_reply_whose_data_is_not_what_its_metadata_says_fails_to_unpack() -> None:
    """The audit reads the arrays' dtype and shape only (no copy of 12 MB per check); the data
    is read once, when unpacking, which refuses numbers that do not match their metadata."""
    reply = _reply()
    honest = reply.array_records[ARRAYS]["values"]
    short = np.zeros(3, dtype=np.float32)
    reply.array_records[ARRAYS]["values"] = Array(
        dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=Array(short).data
    )
    assert audit_reply(reply, kind="train", expected=EXPECTED) == []
    assert record_bytes(reply.array_records[ARRAYS]) == 80 * 4 + 1 * 8  # values + integers
    with pytest.raises(ValueError):
        from_record(reply.array_records[ARRAYS], "float32", EXPECTED)
