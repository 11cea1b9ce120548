"""The trainer's DP-SGD machinery: going private, and one noisy step over a Poisson batch.

Under DP-SGD (:func:`privatise`, :mod:`fedsynth.common.privacy`) every network is an Opacus
``GradSampleModule`` with a ``DPOptimizer``, and:

* discriminators are "frozen" during the generator update by a context that disables their hooks
  (so the generator's backward does not accumulate per-sample gradients in D); without DP it turns
  off ``requires_grad`` instead (saving work);
* gradients are cleared with ``set_to_none=True`` right before each network's own backward;
* every loss is a mean over examples of each example's own loss (Opacus' ``loss_reduction=
  "mean"``);
* the image pool is off (it would mix one example's fake into another step's gradient);
* a Poisson batch is processed in chunks of one kind of example each (paired, unpaired; at most
  ``privacy.max_physical_batch_size`` examples) whose clipped per-sample gradients are summed
  before one noisy step (Opacus' ``signal_skip_step`` mechanism, as in its
  ``BatchMemoryManager``, applied to all optimisers of the step at once); a network with no
  forward pass in a chunk (R in an unpaired one) adds an empty per-sample gradient, so it still
  takes its noise step when the whole batch held no example for it;
* the FedProx term, which reads no data, is added to the privatised gradient after the noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from fedsynth.common.training.objectives import Batch, Examples, batch_size, merge_metrics

if TYPE_CHECKING:
    from fedsynth.common.privacy.plan import NoisePlan
    from fedsynth.common.training.trainer import CycleGANTrainer


def privatise(trainer: CycleGANTrainer, plan: NoisePlan) -> None:
    """Put every trained network under Opacus' per-sample clipping and noise, with one accountant.

    See :meth:`~fedsynth.common.training.trainer.CycleGANTrainer.make_private`.
    """
    from fedsynth.common.privacy.accounting import SiteAccountant
    from fedsynth.common.privacy.dp_sgd import make_private

    if trainer.privacy is None:
        raise ValueError(
            "make_private needs privacy.enabled with privacy.level = 'patient' or 'example'"
        )
    trained = trainer.trained_names
    if plan.networks != len(trained):
        raise ValueError(
            f"the noise plan was made for {plan.networks} private networks, this trainer "
            f"trains {len(trained)} ({', '.join(trained)})"
        )
    nets, optimizers = make_private(
        {name: trainer.nets[name] for name in trained},
        {name: trainer.optimizers[name] for name in trained},
        trainer.privacy,
        plan,
        trainer.privacy.batch_size or trainer.config.batch_size,
    )
    trainer.nets.update(nets)
    trainer.optimizers.update(optimizers)
    trainer.plan = plan
    trainer.accountant = SiteAccountant(trainer.privacy.accountant, trainer.privacy.delta)


def private_update(trainer: CycleGANTrainer, batch: Batch | Any) -> dict[str, float]:
    """One DP-SGD step of every private network over a Poisson batch (possibly empty).

    The step is recorded by the site's accountant.
    """
    assert trainer.privacy is not None and trainer.plan is not None
    assert trainer.accountant is not None
    size = batch_size(batch)
    if size == 0:
        _empty_step(trainer)
        trainer.accountant.step(trainer.plan)
        return {"batch_size": 0.0}
    limit = trainer.privacy.max_physical_batch_size or size
    # Generators (and R): one kind of example per chunk, since a hooked module must see one
    # batch size per backward. Neither G nor D moves before its last chunk, so every fake
    # comes from the step's starting G and every score from its starting D, as without DP.
    chunks = Examples.from_batch(batch, trainer.device).chunks(limit)
    parts, fakes = [], []
    for index, chunk in enumerate(chunks):
        _skip_unless(trainer, index == len(chunks) - 1, trainer.generator_names)
        metrics, fake_a, fake_b = trainer._generator_update(chunk)
        parts.append((len(chunk), metrics))
        fakes.append((chunk.a, chunk.b, fake_a, fake_b))
    # Discriminators read any kind alike: chunks of ``limit`` examples over the whole batch.
    real_a = torch.cat([chunk_a for chunk_a, _, _, _ in fakes])
    real_b = torch.cat([chunk_b for _, chunk_b, _, _ in fakes])
    fake_b = torch.cat([fb for _, _, _, fb in fakes])
    one_way = any(fa is None for _, _, fa, _ in fakes)
    fake_a = None if one_way else torch.cat([fa for _, _, fa, _ in fakes if fa is not None])
    for begin in range(0, size, limit):
        end = begin + limit
        _skip_unless(trainer, end >= size, trainer.discriminator_names)
        metrics = trainer._discriminator_update(
            real_a[begin:end],
            real_b[begin:end],
            None if fake_a is None else fake_a[begin:end],
            fake_b[begin:end],
        )
        parts.append((min(end, size) - begin, metrics))
    trainer.accountant.step(trainer.plan)
    totals = merge_metrics(parts)
    totals["batch_size"] = float(size)
    return totals


def _empty_step(trainer: CycleGANTrainer) -> None:
    """An empty Poisson batch: every private network still takes a pure-noise step."""
    from fedsynth.common.privacy.dp_sgd import mark_empty_batch

    for name in trainer.trained_names:
        optimizer = trainer.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        mark_empty_batch(optimizer)
        trainer._clip_and_step([name], {})
        optimizer.zero_grad(set_to_none=True)


def _skip_unless(trainer: CycleGANTrainer, last: bool, names: Iterable[str]) -> None:
    """The named optimisers only clip and accumulate, unless ``last`` (then they step)."""
    for name in names:
        trainer.optimizers[name].signal_skip_step(do_skip=not last)  # type: ignore[attr-defined]
