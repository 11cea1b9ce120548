"""One pass of a trainer over a loader: progress bar, periodic report lines, mean losses, speed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsynth.common.training.objectives import Batch, batch_size

if TYPE_CHECKING:
    from fedsynth.common.training.trainer import CycleGANTrainer

# ``report(steps, total, samples_per_s, last_losses)``
Report = Callable[[int, int | None, float, dict[str, float]], None]


def run_epoch(
    trainer: CycleGANTrainer,
    loader: Iterable[Batch],
    *,
    max_steps: int | None,
    progress: bool,
    description: str,
    report: Report | None,
    report_every_s: float,
) -> dict[str, float]:
    """See :meth:`~fedsynth.common.training.trainer.CycleGANTrainer.train_epoch`."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(trainer.epoch)
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # an empty DP batch reports no loss
    steps = samples = 0
    start = last_report = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")
        for batch in loader:
            if max_steps is not None and steps >= max_steps:
                break
            metrics = trainer.train_step(batch)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            steps += 1
            samples += batch_size(batch)
            rate = samples / max(time.perf_counter() - start, 1e-9)
            if report is not None and time.perf_counter() - last_report >= report_every_s:
                report(steps, total, rate, metrics)
                last_report = time.perf_counter()
            bar.update(
                task,
                advance=1,
                info=f"G {metrics.get('loss_g', math.nan):.3f}  "
                f"D {metrics.get('loss_d_a', math.nan):.3f}/"
                f"{metrics.get('loss_d_b', math.nan):.3f}  {rate:.1f} samples/s",
            )
    seconds = time.perf_counter() - start
    summary = {key: value / counts[key] for key, value in sums.items()}
    summary.update(
        steps=float(steps),
        samples=float(samples),
        seconds=seconds,
        samples_per_s=samples / seconds if seconds > 0 else math.nan,
        lr=trainer.lr,
    )
    return summary
