"""What travels between the coordinator and a hospital, in one place both sides import.

A train instruction carries the global networks (``arrays``) and the round's instruction
(``config``, :class:`RoundInstruction`): what changes from round to round, and the coordinator's
resolved run configuration by its SHA-256, so every site trains the same model on the same
preprocessing. The configuration's TOML itself travels only to a site that has not yet shown it
holds it (its first message of the run, or the one after a failed reply). A site's reply carries its
update (trained weights minus the weights it received, :func:`update_from`) and scalar metrics only.
Sending the update rather than the weights is what makes half precision on the wire safe: a step
much smaller than a weight survives rounding to float16/bfloat16 as an update, but would vanish if
the weight itself were rounded. The coordinator adds the updates to its float32 master weights
(:func:`apply_update`), like mixed-precision training keeps float32 master weights.
:func:`audit_reply` states the rule a reply must follow, and the coordinator applies it to every
reply before looking at the weights: only the shared state, packed as numbers in the order the
coordinator sent it, and the whitelisted metric names; never text, never an image-shaped array.

Network parameters are flattened to ``"<net>.<param>"`` keys (``g_ab.model.1.weight``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsynth.common.config import FederationConfig, RunConfig, loads_config
from fedsynth.common.wire import LAYOUT, layout_of, pack, packed_problems, read_layout, unpack

SITE_ERROR = 100  # a site declined the round for a reason it states (no path, no subject)
SITE_CRASH = 101  # an unexpected exception at a site (details in the site's own log)
SITE_BUDGET = 102  # a site refused to train: one more round would pass its privacy budget

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

Share = Literal["generators", "all"]
SHARED_NETS: dict[str, tuple[str, ...]] = {
    "generators": ("g_ab", "g_ba"),
    "all": ("g_ab", "g_ba", "d_a", "d_b"),
}

# The only scalar names a site may report. Counts and losses reveal nothing about one patient
# beyond what the shared weights already do; anything else is refused by the coordinator.
TRAIN_METRICS = frozenset(
    {
        "num-examples",
        "steps",
        "seconds",
        "samples-per-s",
        "loss_g",
        "loss_gan",
        "loss_cycle",
        "loss_identity",
        "loss_d_a",
        "loss_d_b",
        "loss_registration",
        "loss_smooth",
        "loss_proximal",
        "lr",
        "epsilon",
        "delta",
        "partition-id",
    }
)
EVALUATE_METRICS = frozenset(
    {
        "num-examples",
        "num-subjects",
        "seconds",
        "psnr",
        "ssim",
        "mae",
        "nmse",
        "psnr_masked",
        "ssim_masked",
        "mae_masked",
        "nmse_masked",
        "partition-id",
    }
)


def config_digest(text: str) -> str:
    """The SHA-256 of a resolved configuration's TOML, by which an instruction names it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RoundInstruction:
    """The coordinator's request for one round (travels as a ``ConfigRecord``).

    Only what changes from round to round travels each time: the round and the sites' learning
    rate. The run's resolved configuration (TOML) travels by content: ``config_digest`` always,
    ``run_config`` only to a site the coordinator does not know to hold it; the site keeps it
    and fills it in (:mod:`fedsynth.client.instruction`). The rest of a round's settings (local
    epochs or steps, the FedProx weight, what is shared, the wire precision) is read from that
    configuration, so nothing travels twice.
    """

    round: int
    lr: float
    run_key: str
    config_digest: str
    run_config: str = ""  # resolved configuration, TOML; "" when the site holds it already

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "round": self.round,
            "lr": self.lr,
            "run-key": self.run_key,
            "config-digest": self.config_digest,
        }
        if self.run_config:
            record["run-config"] = self.run_config
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundInstruction:
        try:
            return cls(
                round=int(record["round"]),
                lr=float(record["lr"]),
                run_key=str(record["run-key"]),
                config_digest=str(record["config-digest"]),
                run_config=str(record.get("run-config", "")),
            )
        except KeyError as exc:
            raise ValueError(f"the coordinator's instruction lacks {exc.args[0]!r}") from None

    def config(self) -> RunConfig:
        """The run's configuration, a copy of its own for the caller to change."""
        return self._parsed.model_copy(deep=True)

    @cached_property
    def _parsed(self) -> RunConfig:
        """The configuration, parsed once per instruction (a site reads it several times)."""
        if not self.run_config:
            raise ValueError(
                f"the instruction names configuration {self.config_digest[:12]} but does not "
                "carry it: the site must fill it in from what it holds"
            )
        return loads_config(self.run_config, "coordinator")

    @property
    def _federation(self) -> FederationConfig:
        return self._parsed.federation

    @property
    def local_epochs(self) -> int:
        return self._federation.local_epochs

    @property
    def local_steps(self) -> int:
        """Steps of the round; 0: train ``local_epochs`` epochs."""
        return self._federation.local_steps or 0

    @property
    def proximal_mu(self) -> float:
        """The FedProx weight: ``federation.proximal_mu`` under ``strategy = "fedprox"``, else 0."""
        fed = self._federation
        return fed.proximal_mu if fed.strategy == "fedprox" else 0.0

    @property
    def share(self) -> str:
        return self._federation.share

    @property
    def wire_dtype(self) -> str:
        return self._federation.wire_dtype


def flatten(nets: Mapping[str, torch.nn.Module], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{"g_ab.<param>": tensor, ...}`` for the named networks (floating point + buffers).

    A network wrapped for DP-SGD (Opacus' ``GradSampleModule``) is read through its inner
    module, so private and non-private sites send the same keys.
    """
    out: dict[str, torch.Tensor] = {}
    for name in names:
        net = nets[name]
        inner = getattr(net, "_module", None)
        net = inner if isinstance(inner, torch.nn.Module) else net
        for key, value in net.state_dict().items():
            out[f"{name}.{key}"] = value.detach()
    return out


def unflatten(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`flatten`: ``{"g_ab": {"<param>": tensor}, ...}``."""
    nets: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        net, _, param = key.partition(".")
        nets.setdefault(net, {})[param] = value
    return nets


def update_from(
    trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Trained minus received for floating entries (float32, on CPU); integer buffers as trained."""
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            out[key] = value.float() - received[key].float()
        else:
            out[key] = value.clone()
    return out


def apply_update(
    master: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The site's weights as the coordinator sees them: ``master + update`` (keys of ``update``)."""
    return {
        key: master[key] + value if value.is_floating_point() and key in master else value
        for key, value in update.items()
    }


def to_record(
    state: Mapping[str, torch.Tensor], wire_dtype: str, *, layout: bool = False
) -> ArrayRecord:
    """Pack a flat state for the wire (:func:`fedsynth.common.wire.pack`: float16/bfloat16 if asked,
    integers unchanged); ``layout=True`` adds the names and shapes (the coordinator's message)."""
    return ArrayRecord(
        {k: Array(v) for k, v in pack(state, wire_dtype, with_layout=layout).items()}
    )


def from_record(
    record: ArrayRecord, wire_dtype: str, reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` to float32 tensors (integer entries in their own dtype).

    ``reference`` (the global state) gives the layout, in its order; without it the record's
    own layout is used (a site reading the coordinator's message).

    Raises:
        ValueError: the record does not fit the layout.
    """
    arrays = {key: record[key].numpy() for key in record}
    slots = layout_of(reference) if reference is not None else read_layout(arrays)
    return unpack(arrays, wire_dtype, slots)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the weights in a record (the layout, a few KB of names, not counted),
    from the arrays' dtype and shape: the data is not read (call after :func:`audit_reply`)."""
    return int(
        sum(
            math.prod(record[key].shape) * np.dtype(record[key].dtype).itemsize
            for key in record
            if key != LAYOUT
        )
    )


def metrics_record(values: Mapping[str, float | int]) -> MetricRecord:
    """A ``MetricRecord`` of plain Python numbers (numpy scalars converted)."""
    return MetricRecord(
        {
            k: int(v) if isinstance(v, bool | int | np.integer) else float(v)
            for k, v in values.items()
        }
    )


def scalar_metrics(content: RecordDict) -> dict[str, float]:
    """The reply's metrics as floats (call after :func:`audit_reply` found no problem)."""
    out: dict[str, float] = {}
    for key, value in content.metric_records[METRICS].items():
        if isinstance(value, list):
            raise ValueError(f"metric {key!r} is a list, expected a number")
        out[key] = float(value)
    return out


def audit_reply(
    content: RecordDict,
    *,
    kind: Literal["train", "evaluate"],
    expected: Mapping[str, torch.Tensor] | None,
    wire_dtype: str = "float32",
) -> list[str]:
    """Every way a site's reply breaks the content rule (empty when it is acceptable).

    Args:
        content: the reply's records.
        kind: ``"train"`` replies must carry ``arrays`` and ``metrics``; ``"evaluate"`` replies
            carry ``metrics`` only.
        expected: the shared state the reply's arrays must fit (train replies): packed in
            ``wire_dtype`` in this state's order, numbers only.
        wire_dtype: the run's ``federation.wire_dtype``.
    """
    problems: list[str] = []
    allowed = TRAIN_METRICS if kind == "train" else EVALUATE_METRICS
    wanted = {ARRAYS, METRICS} if kind == "train" else {METRICS}
    names = set(content.keys())
    if names - wanted:
        problems.append(f"unexpected records: {', '.join(sorted(names - wanted))}")
    if METRICS not in content.metric_records:
        problems.append("no metrics record")
    else:
        metrics = content.metric_records[METRICS]
        extra = set(metrics.keys()) - allowed
        if extra:
            problems.append(f"metrics outside the whitelist: {', '.join(sorted(extra))}")
        for key, value in metrics.items():
            if isinstance(value, list) or not isinstance(value, int | float):
                problems.append(f"metric {key!r} is not a scalar number")
    if kind == "train":
        if ARRAYS not in content.array_records:
            problems.append("no arrays record")
        else:
            record = content.array_records[ARRAYS]
            if LAYOUT in record:
                problems.append("carries a layout: a site sends numbers only")
            for key in record:
                if len(record[key].shape) > 1:
                    problems.append(f"array {key!r} has {len(record[key].shape)} dimensions")
            if expected is not None:  # from the arrays' metadata; unpacking checks the data
                arrays = {k: (str(record[k].dtype), tuple(record[k].shape)) for k in record}
                arrays.pop(LAYOUT, None)
                problems += packed_problems(arrays, wire_dtype, layout_of(expected))
    if content.config_records:
        problems.append("carries a config record: a site never sends text")
    return problems
