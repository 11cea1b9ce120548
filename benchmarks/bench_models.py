"""Training-step and inference benchmark: our trainer against a bare PyTorch loop, and synthesis.

Run from the project root (quiet machine, nothing else running):

    .venv/bin/python -m benchmarks.bench_models [--steps 20] [--rounds 3] [--preset cpu-small]

Part 1 times a CycleGAN training step at the preset's size with :class:`CycleGANTrainer` and with
a bare loop written here (same networks, same losses, same optimisers, none of the trainer's
bookkeeping), interleaving the two so that machine noise hits both alike; it prints the medians
and their ratio. Part 2 times the synthesis of a whole 240x240x155 volume (the real site-a T1w
when ../shared/data is present, else a synthetic head) at the cpu-small and gpu-paper sizes, in
fp32 and with bf16 autocast, and the largest bf16-vs-fp32 difference of the outputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fedsynth.common.checkpoint import CheckpointMetadata, save_checkpoint
from fedsynth.common.config import RunConfig, load_config
from fedsynth.common.losses import (
    cycle_loss,
    discriminator_loss,
    generator_adversarial_loss,
    identity_loss,
)
from fedsynth.common.models import define_discriminator, define_generator, init_weights
from fedsynth.common.synthesis import Synthesizer
from fedsynth.common.training.trainer import CycleGANTrainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-mri"


class BareLoop:
    """The reference: a CycleGAN step with nothing but the arithmetic."""

    def __init__(self, config: RunConfig):
        torch.manual_seed(0)
        m, t, size = config.model, config.training, config.data.image_size
        self.g_ab, self.g_ba = (init_weights(define_generator(m, size)) for _ in range(2))
        self.d_a, self.d_b = (init_weights(define_discriminator(m)) for _ in range(2))
        betas = (t.beta1, t.beta2)
        self.opt_g = torch.optim.Adam(
            [*self.g_ab.parameters(), *self.g_ba.parameters()], lr=t.lr, betas=betas
        )
        self.opt_d = torch.optim.Adam(
            [*self.d_a.parameters(), *self.d_b.parameters()], lr=t.lr, betas=betas
        )
        self.t = t

    def step(self, a: torch.Tensor, b: torch.Tensor) -> None:
        t = self.t
        self.opt_g.zero_grad(set_to_none=True)
        for p in [*self.d_a.parameters(), *self.d_b.parameters()]:
            p.requires_grad_(False)
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        loss = (
            generator_adversarial_loss(t.gan_loss, self.d_b(fake_b))
            + generator_adversarial_loss(t.gan_loss, self.d_a(fake_a))
            + t.lambda_cycle * (cycle_loss(self.g_ba(fake_b), a) + cycle_loss(self.g_ab(fake_a), b))
        )
        if t.lambda_identity > 0:
            loss = loss + t.lambda_identity * (
                identity_loss(self.g_ab(b), b) + identity_loss(self.g_ba(a), a)
            )
        loss.backward()
        self.opt_g.step()
        for p in [*self.d_a.parameters(), *self.d_b.parameters()]:
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        fb, fa = fake_b.detach(), fake_a.detach()
        loss_d = discriminator_loss(t.gan_loss, self.d_b(b), self.d_b(fb)) + discriminator_loss(
            t.gan_loss, self.d_a(a), self.d_a(fa)
        )
        loss_d.backward()
        self.opt_d.step()


def time_steps(step: object, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    times = []
    for a, b in batches:
        start = time.perf_counter()
        step(a, b)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def bench_training(config: RunConfig, steps: int, rounds: int) -> list[str]:
    size, batch = config.data.image_size, config.training.batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand(batch, 1, size, size, generator=gen) * 2 - 1,
            torch.rand(batch, 1, size, size, generator=gen) * 2 - 1,
        )
        for _ in range(steps)
    ]
    trainer = CycleGANTrainer(config.model, config.training, size, registration=False)
    bare = BareLoop(config)

    def ours(a: torch.Tensor, b: torch.Tensor) -> None:
        trainer.train_step({"a": a, "b": b})

    time_steps(ours, batches[:3])  # warm-up
    time_steps(bare.step, batches[:3])
    our_times: list[float] = []
    bare_times: list[float] = []
    for _ in range(rounds):  # interleaved: noise hits both alike
        our_times += time_steps(ours, batches)
        bare_times += time_steps(bare.step, batches)
    ours_s, bare_s = statistics.median(our_times), statistics.median(bare_times)
    return [
        f"| training step, {config.preset}, batch {batch}, {size}x{size}: fedsynth trainer "
        f"| {ours_s:.3f} s ({batch / ours_s:.1f} samples/s) |",
        f"| training step, same networks, bare PyTorch loop | {bare_s:.3f} s "
        f"({batch / bare_s:.1f} samples/s) |",
        f"| ratio trainer / bare loop (medians of {len(our_times)} steps each) "
        f"| {ours_s / bare_s:.3f} |",
    ]


def bench_inference(
    preset: str, volume: Path, repeats: int, modes: tuple[bool, ...] = (False, True)
) -> list[str]:
    config = load_config(preset=preset, environ={})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        g_ab = init_weights(define_generator(config.model, config.data.image_size), seed=0)
        g_ba = init_weights(define_generator(config.model, config.data.image_size), seed=1)
        meta = CheckpointMetadata(
            kind="untrained", direction="T1w->T2w", model=config.model, data=config.data
        )
        ckpt = save_checkpoint(Path(tmp) / "ckpt", {"g_ab": g_ab, "g_ba": g_ba}, meta)
        outputs = {}
        for bf16 in modes:
            synth = Synthesizer(ckpt, device="cpu", batch_size=8, bf16=bf16)
            out = Path(tmp) / f"out-{bf16}.nii.gz"
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = synth.synthesize(volume, out)
                times.append(time.perf_counter() - start)
            outputs[bf16] = np.asarray(nib.load(out).dataobj)
            label = "bf16 autocast" if bf16 else "fp32"
            rows.append(
                f"| synthesize 240x240x155 volume, {preset} ({result.slices} slices of "
                f"{config.data.image_size}x{config.data.image_size}), {label} "
                f"| {statistics.median(times):.2f} s |"
            )
            print(rows[-1], flush=True)
        if len(outputs) == 2:
            diff = np.abs(outputs[True] - outputs[False]) / (result.scale.high - result.scale.low)
            rows.append(
                f"| bf16 vs fp32 / output range, {preset} (untrained weights): mean, p99, max "
                f"| {diff.mean():.4f}, {np.percentile(diff, 99):.4f}, {diff.max():.4f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--skip-paper", action="store_true", help="Skip gpu-paper inference.")
    parser.add_argument(
        "--paper-bf16",
        action="store_true",
        help="Also time gpu-paper in bf16 (very slow on CPUs without native bf16).",
    )
    args = parser.parse_args()
    config = load_config(preset=args.preset, environ={})
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    rows = bench_training(config, args.steps, args.rounds)
    print("\n".join(rows), flush=True)

    volume = SHARED / "site-a/sub-gli001/anat/sub-gli001_T1w.nii.gz"
    if not volume.exists():
        from tests.conftest import head_volume, save_nifti

        volume = save_nifti(
            Path(tempfile.mkdtemp()) / "sub-01_T1w.nii.gz", head_volume("T1w", (240, 240, 155))
        )
    rows += bench_inference("cpu-small", volume, args.repeats)
    if not args.skip_paper:
        modes = (False, True) if args.paper_bf16 else (False,)
        rows += bench_inference("gpu-paper", volume, max(1, args.repeats - 2), modes)


if __name__ == "__main__":
    main()
