"""Local CycleGAN training at one site: the object the federated client and both baselines share.

:class:`CycleGANTrainer` owns the four CycleGAN networks (G_AB, G_BA, D_A, D_B; Zhu et al. 2017
call them G, F, D_Y, D_X) and, when the data is misaligned, the RegGAN registration network R
(Kong et al. 2021), each with its own Adam optimiser and learning-rate schedule. One optimiser per
network keeps two later needs simple: per-network gradient clipping and per-network Opacus
wrapping (every network that sees a real image gets its own private optimiser). The generators'
objective depends on the kind of each example (weakly paired: pix2pix or RegGAN NC+R; unpaired:
CycleGAN) and lives in :mod:`fedsynth.common.training.objectives`; R only ever sees paired examples.

Under DP-SGD (:meth:`CycleGANTrainer.make_private`, :mod:`fedsynth.common.privacy`) every network
that trains is an Opacus ``GradSampleModule`` with a ``DPOptimizer``; how a private step differs
is in :mod:`fedsynth.common.training.private_step`. The image pool is in
:mod:`~fedsynth.common.training.pool`, saving and restoring the whole local state (RNGs
included) in :mod:`~fedsynth.common.training.state`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Adam
from torch.optim.lr_scheduler import LambdaLR

from fedsynth.common.config import ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.device import resolve_device
from fedsynth.common.losses import discriminator_loss
from fedsynth.common.models import define_cyclegan, freeze_encoder
from fedsynth.common.training.epoch import Report, run_epoch
from fedsynth.common.training.objectives import (
    Batch,
    Examples,
    Objective,
    generator_objective,
)
from fedsynth.common.training.pool import ImagePool
from fedsynth.common.training.private_step import private_update, privatise
from fedsynth.common.training.schedule import linear_decay
from fedsynth.common.training.state import (
    load_trainer_file,
    load_trainer_state,
    save_trainer_state,
    saved_plan,
    trainer_state,
    unwrap,
)

if TYPE_CHECKING:
    from fedsynth.common.privacy.accounting import SiteAccountant
    from fedsynth.common.privacy.plan import NoisePlan

logger = logging.getLogger(__name__)


class CycleGANTrainer:
    """CycleGAN (optionally with RegGAN's registration-corrected loss) at one site.

    Args:
        model: network configuration.
        training: optimisation configuration (seed, lr, loss weights, clipping, device, bf16).
        image_size: slice height and width.
        registration: train R and use the correction loss (default: ``training.registration ==
            "on"``; callers with the whole run configuration pass ``registration_enabled``).
        device: override ``training.device``.
        privacy: the run's privacy settings; with DP-SGD (patient or slice level) the pool is
            off and :meth:`make_private` must be called before training.
    """

    def __init__(
        self,
        model: ModelConfig,
        training: TrainingConfig,
        image_size: int,
        *,
        registration: bool | None = None,
        device: str | torch.device | None = None,
        privacy: PrivacyConfig | None = None,
    ):
        self.model_config = model
        self.config = training
        self.image_size = image_size
        self.registration = training.registration == "on" if registration is None else registration
        self.privacy = privacy if privacy is not None and privacy.dp_sgd else None
        # Patient-level DP trains the A->B networks only (privacy.networks = "objective").
        self.one_way = self.privacy is not None and self.privacy.one_way
        self.generator_names = ["g_ab"] + ([] if self.one_way else ["g_ba"])
        self.generator_names += ["r"] if self.registration else []
        self.discriminator_names = ["d_b"] + ([] if self.one_way else ["d_a"])
        self.device = resolve_device(device if device is not None else training.device)
        self.use_bf16 = bool(training.bf16 and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed slice size: let cuDNN pick kernels

        self.nets = define_cyclegan(
            model, image_size, seed=training.seed, registration=self.registration
        )
        for net in self.nets.values():
            net.to(self.device)
        for name in self.frozen_names:  # they keep their starting weights
            self.nets[name].requires_grad_(False)
        if self.privacy is not None and self.privacy.trainable == "decoder":
            for name in ("g_ab", "g_ba"):
                freeze_encoder(self.nets[name])

        betas = (training.beta1, training.beta2)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            name: Adam(net.parameters(), lr=training.lr, betas=betas)
            for name, net in self.nets.items()
        }
        schedule = linear_decay(training.epochs, training.decay_epochs)
        self.schedulers = {
            name: LambdaLR(opt, lr_lambda=schedule) for name, opt in self.optimizers.items()
        }
        pool_size = 0 if self.privacy is not None else training.pool_size
        self.pools = {
            "a": ImagePool(pool_size, seed=training.seed),
            "b": ImagePool(pool_size, seed=training.seed + 1),
        }
        self.plan: NoisePlan | None = None
        self.accountant: SiteAccountant | None = None
        self.step = 0
        self.epoch = 0
        self.proximal_mu = 0.0
        self._anchor: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ accessors

    @property
    def trained_names(self) -> list[str]:
        """The networks that train (and, under DP-SGD, are private)."""
        return [*self.generator_names, *self.discriminator_names]

    @property
    def frozen_names(self) -> list[str]:
        """Networks that keep their starting weights: G_BA and D_A when training is one-way."""
        trained = set(self.trained_names)
        return [name for name in self.nets if name not in trained]

    @property
    def g_ab(self) -> nn.Module:
        return self.nets["g_ab"]

    @property
    def g_ba(self) -> nn.Module:
        return self.nets["g_ba"]

    def generators(self) -> dict[str, nn.Module]:
        """The networks a federation shares (G_AB and G_BA)."""
        # Unwrapped: a DP run's checkpoint must load into a plain generator.
        return {"g_ab": unwrap(self.nets["g_ab"]), "g_ba": unwrap(self.nets["g_ba"])}

    @property
    def lr(self) -> float:
        return float(self.optimizers["g_ab"].param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Set every network's learning rate (a federation's coordinator schedules it per round)."""
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def set_proximal(self, mu: float) -> None:
        """FedProx: from now on add ``mu / 2 * ||w - w_now||^2`` over the generators' weights.

        Call it right after loading the round's global generators; ``mu = 0`` turns it off.
        """
        self.proximal_mu = mu
        self._anchor = (
            {
                name: [p.detach().clone() for p in net.parameters()]
                for name, net in self.generators().items()
            }
            if mu > 0
            else {}
        )

    @property
    def private(self) -> bool:
        """Whether DP-SGD is active (:meth:`make_private` was called)."""
        return self.plan is not None

    def make_private(self, plan: NoisePlan) -> None:
        """Put every network under Opacus' per-sample clipping and noise, with one accountant.

        Call it once, before training and before :meth:`load_state_dict` restores a saved
        accountant. Every network that trains reads a real image (directly, or through a fake
        made from one), so every one of them becomes private; a frozen one (G_BA and D_A in
        one-way training) reads nothing and stays as it is.
        """
        privatise(self, plan)

    def epsilon(self) -> float:
        """Cumulative epsilon of this site at ``privacy.delta`` (0 without DP)."""
        return self.accountant.epsilon() if self.accountant is not None else 0.0

    def _proximal_term(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, anchor in self._anchor.items():
            for param, start in zip(self.nets[name].parameters(), anchor, strict=True):
                total = total + ((param - start) ** 2).sum()
        return total

    # ------------------------------------------------------------------ training

    @contextlib.contextmanager
    def _frozen(self, *names: str) -> Iterator[None]:
        """Keep the named networks' parameters out of the current backward pass."""
        modules = [self.nets[n] for n in names]
        hooked = [m for m in modules if hasattr(m, "disable_hooks")]
        plain = [m for m in modules if not hasattr(m, "disable_hooks")]
        for m in hooked:
            m.disable_hooks()  # type: ignore[operator]
        for m in plain:
            m.requires_grad_(False)
        try:
            yield
        finally:
            for m in hooked:
                m.enable_hooks()  # type: ignore[operator]
            for m in plain:
                m.requires_grad_(True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _clip_and_step(self, names: Iterable[str], metrics: dict[str, float]) -> None:
        for name in names:
            net = self.nets[name]
            optimizer = self.optimizers[name]
            if self.private:
                # Clip per sample, sum, and (on the last chunk of a batch) add noise; then the
                # data-free FedProx gradient, then Adam. pre_step is False on a skipped chunk.
                if optimizer.pre_step():  # type: ignore[attr-defined]
                    self._add_proximal_grad(name)
                    optimizer.original_optimizer.step()  # type: ignore[attr-defined]
                continue
            if self.config.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.config.max_grad_norm)
                metrics[f"grad_norm_{name}"] = float(norm)
            self.optimizers[name].step()

    def _add_proximal_grad(self, name: str) -> None:
        """Under DP: add FedProx's ``mu (w - w_round)`` to the privatised gradient."""
        anchor = self._anchor.get(name)
        if not anchor:
            return
        for param, start in zip(self.nets[name].parameters(), anchor, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - start, alpha=self.proximal_mu)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One update of the generators (and R), then of both discriminators.

        ``batch``: ``"a"``, ``"b"``, optional ``"a_mask"``, ``"b_mask"``, ``"paired"`` (see
        :class:`~fedsynth.common.training.objectives.Examples`). Under DP a Poisson batch (possibly
        empty), and the step is recorded by the site's accountant.
        """
        for net in self.nets.values():
            net.train()
        if not self.private:
            examples = Examples.from_batch(batch, self.device)
            metrics, fake_a, fake_b = self._generator_update(examples)
            metrics.update(self._discriminator_update(examples.a, examples.b, fake_a, fake_b))
        else:
            metrics = private_update(self, batch)
        self.step += 1
        return metrics

    def generator_loss(self, batch: Batch | Examples) -> Objective:
        """The generators' (and R's) objective on a batch, chosen per example kind.

        See :func:`fedsynth.common.training.objectives.generator_objective`. Call it with D frozen.
        The FedProx term is not included. A mean over examples, so the loss of a batch of one is
        that example's own loss (what the DP tests compare per-sample gradients against).
        """
        examples = batch if isinstance(batch, Examples) else Examples.from_batch(batch, self.device)
        with self._autocast():
            return generator_objective(
                self.nets,
                examples,
                self.config,
                registration=self.registration,
                one_way=self.one_way,
            )

    def discriminator_loss(self, name: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D_A's or D_B's loss: real vs (pooled, detached) fake."""
        with self._autocast():
            net = self.nets[name]
            return discriminator_loss(self.config.gan_loss, net(real), net(fake.float()))

    def _generator_update(
        self, examples: Examples
    ) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor]:
        """Back-propagate the generators' objective and step them; return metrics and fakes."""
        generator_names = self.generator_names
        for name in generator_names:
            self.optimizers[name].zero_grad(set_to_none=True)
        # D is frozen through the backward too: its Opacus hooks must stay off until then.
        with self._frozen(*self.discriminator_names):
            objective = self.generator_loss(examples)
            metrics = dict(objective.metrics)
            loss_g = objective.loss
            if self._anchor:
                if self.private:  # added to the noisy gradient instead (data-free)
                    with torch.no_grad():
                        loss_prox = self._proximal_term()
                else:
                    loss_prox = self._proximal_term()
                    loss_g = loss_g + self.proximal_mu / 2 * loss_prox
                metrics["loss_proximal"] = _value(loss_prox)
            loss_g.backward()
        if self.private:
            from fedsynth.common.privacy.dp_sgd import mark_empty_batch

            for name in generator_names:
                if name not in objective.used:  # R in an unpaired chunk: nothing to add
                    mark_empty_batch(self.optimizers[name])
            self._clip_and_step(generator_names, metrics)
        else:
            self._clip_and_step([n for n in generator_names if n in objective.used], metrics)
        metrics["loss_g"] = _value(loss_g)
        fake_a = None if objective.fake_a is None else objective.fake_a.detach()
        return metrics, fake_a, objective.fake_b.detach()

    def _discriminator_update(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        fake_a: torch.Tensor | None,
        fake_b: torch.Tensor,
    ) -> dict[str, float]:
        """D_B: real b vs (pooled) fake b; D_A: real a vs fake a; both kinds of example alike.

        One-way training has no fake a and trains D_B only.
        """
        metrics: dict[str, float] = {}
        pairs = [("d_b", real_b, self.pools["b"].query(fake_b))]
        if "d_a" in self.discriminator_names:
            assert fake_a is not None
            pairs.append(("d_a", real_a, self.pools["a"].query(fake_a)))
        for name, real, fake in pairs:
            self.optimizers[name].zero_grad(set_to_none=True)
            loss_d = self.discriminator_loss(name, real, fake)
            loss_d.backward()
            self._clip_and_step([name], metrics)
            self.optimizers[name].zero_grad(set_to_none=True)
            metrics[f"loss_{name}"] = _value(loss_d)
        return metrics

    def train_epoch(
        self,
        loader: Iterable[Batch],
        *,
        max_steps: int | None = None,
        progress: bool = False,
        description: str = "training",
        report: Report | None = None,
        report_every_s: float = 30.0,
    ) -> dict[str, float]:
        """Run over ``loader`` once (or ``max_steps`` batches); return mean losses and speed.

        ``report(steps, total, samples_per_s, last_losses)`` is called every ``report_every_s``
        seconds, for logs where a progress bar cannot go (a hospital daemon's).
        Does not advance the learning-rate schedule: call :meth:`end_epoch` for that.
        """
        return run_epoch(
            self,
            loader,
            max_steps=max_steps,
            progress=progress,
            description=description,
            report=report,
            report_every_s=report_every_s,
        )

    def end_epoch(self) -> None:
        """Advance every learning-rate schedule by one epoch."""
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.epoch += 1

    def fit(
        self,
        loader: Iterable[Batch],
        epochs: int,
        *,
        metrics_path: Path | None = None,
        progress: bool = False,
        max_steps_per_epoch: int | None = None,
    ) -> list[dict[str, float]]:
        """Train ``epochs`` epochs, appending one JSON line per epoch to ``metrics_path``."""
        history = []
        for _ in range(epochs):
            summary = self.train_epoch(
                loader,
                max_steps=max_steps_per_epoch,
                progress=progress,
                description=f"epoch {self.epoch + 1}",
            )
            summary["epoch"] = float(self.epoch + 1)
            summary["step"] = float(self.step)
            self.end_epoch()
            history.append(summary)
            logger.info(
                "epoch %d: G %.4f (cycle %.4f) D_A %.4f D_B %.4f, %.1f samples/s",
                self.epoch,
                summary.get("loss_g", math.nan),
                summary.get("loss_cycle", math.nan),
                summary.get("loss_d_a", math.nan),
                summary.get("loss_d_b", math.nan),
                summary["samples_per_s"],
            )
            if metrics_path is not None:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(summary, sort_keys=True) + "\n")
        return history

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "ab") -> torch.Tensor:
        """Apply G_AB (``"ab"``) or G_BA (``"ba"``) in eval mode; returns CPU float32."""
        net = self.nets["g_ab" if direction == "ab" else "g_ba"]
        net.eval()
        with self._autocast():
            out = net(images.to(self.device))
        return out.float().cpu()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The whole local state: networks, optimisers, schedules, pools, counters and RNGs."""
        return trainer_state(self)

    @staticmethod
    def saved_plan(state: Mapping[str, Any] | None) -> NoisePlan | None:
        """The noise plan a saved state was trained under, if it was private."""
        return saved_plan(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (networks must have the same architecture).

        Under DP call :meth:`make_private` first: the accountant's history is restored too.
        """
        load_trainer_state(self, state)

    def save_state(self, path: Path) -> None:
        """Write :meth:`state_dict` atomically (readable with ``weights_only=True``)."""
        save_trainer_state(self, path)

    def load_state(self, path: Path) -> None:
        """Read a file written by :meth:`save_state`; never unpickles arbitrary objects."""
        load_trainer_file(self, path)


def _value(loss: torch.Tensor) -> float:
    return float(loss.detach().item())
