"""Losses of CycleGAN (Zhu et al., ICCV 2017), pix2pix (Isola et al., CVPR 2017) and RegGAN
(Kong et al., NeurIPS 2021), with optional per-pixel weights (head vs background).

Every loss here is a mean over the examples of each example's own loss, never a sum: without
weights a mean over batch and pixels (or patch scores), each example contributing the same number
of elements; with weights (:func:`pixel_weights`) each example's weighted sum is divided by that
example's own sum of weights first. Either way the loss of a batch equals the mean of the
examples' own losses: exactly what Opacus assumes with ``loss_reduction="mean"`` (it rescales the
gradients by the batch size to recover each example's gradient before clipping). The weights
(``TrainingConfig.lambda_*``) are applied by the caller.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

__all__ = [
    "GanLossKind",
    "cycle_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "identity_loss",
    "paired_l1_loss",
    "pixel_weights",
    "registration_correction_loss",
    "smoothness_loss",
    "weighted_l1_loss",
]


class GanLossKind(StrEnum):
    """Adversarial objectives (``TrainingConfig.gan_loss``); the discriminator outputs raw scores.

    - ``lsgan``: least squares (Mao et al., ICCV 2017), the CycleGAN default: real scores pulled
      to 1, fake to 0.
    - ``vanilla``: the original GAN objective (Goodfellow et al., NeurIPS 2014) as binary
      cross-entropy on logits; the generator uses the non-saturating form.
    - ``hinge``: the hinge loss of Lim & Ye (2017) and Miyato et al. (ICLR 2018).
    """

    LSGAN = "lsgan"
    VANILLA = "vanilla"
    HINGE = "hinge"

    @classmethod
    def parse(cls, kind: str | GanLossKind) -> GanLossKind:
        """The member named ``kind``, or a ``ValueError`` listing the allowed names."""
        try:
            return cls(kind)
        except ValueError:
            allowed = ", ".join(member.value for member in cls)
            raise ValueError(
                f"unknown GAN loss {kind!r} (training.gan_loss); allowed: {allowed}"
            ) from None


def _real_or_fake_loss(kind: GanLossKind, pred: torch.Tensor, real: bool) -> torch.Tensor:
    """The loss of scores ``pred`` against the label real (True) or fake (False)."""
    if kind is GanLossKind.LSGAN:
        return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))
    if kind is GanLossKind.VANILLA:
        return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, 1.0 if real else 0.0))
    # Hinge: a margin of 1 on each side.
    return F.relu(1.0 - pred).mean() if real else F.relu(1.0 + pred).mean()


def discriminator_loss(
    kind: str | GanLossKind, real_pred: torch.Tensor, fake_pred: torch.Tensor
) -> torch.Tensor:
    """Loss of a discriminator on real and (detached) fake images.

    ``0.5 * (loss(real_pred, real) + loss(fake_pred, fake))`` for every kind: the 0.5 is
    CycleGAN's, which slows the discriminator relative to the generator. For ``hinge`` this is
    ``0.5 * (mean(relu(1 - real_pred)) + mean(relu(1 + fake_pred)))``, half the usual sum of
    Lim & Ye (2017), so that switching the kind leaves the discriminator's step size comparable.

    Args:
        kind: ``lsgan``, ``vanilla`` or ``hinge`` (:class:`GanLossKind`).
        real_pred: Scores of real images, ``(batch, 1, h, w)``.
        fake_pred: Scores of generated images, same shape.

    Returns:
        A scalar, the mean over batch and patches.

    Raises:
        ValueError: for an unknown kind.
    """
    loss_kind = GanLossKind.parse(kind)
    return 0.5 * (
        _real_or_fake_loss(loss_kind, real_pred, True)
        + _real_or_fake_loss(loss_kind, fake_pred, False)
    )


def generator_adversarial_loss(kind: str | GanLossKind, fake_pred: torch.Tensor) -> torch.Tensor:
    """Adversarial loss of a generator: its fakes should be scored real.

    ``lsgan``: ``mean((fake_pred - 1)**2)``; ``vanilla``: BCE of the logits against 1 (the
    non-saturating loss); ``hinge``: ``-mean(fake_pred)``.

    Raises:
        ValueError: for an unknown kind.
    """
    loss_kind = GanLossKind.parse(kind)
    if loss_kind is GanLossKind.HINGE:
        return -fake_pred.mean()
    return _real_or_fake_loss(loss_kind, fake_pred, True)


def pixel_weights(mask: torch.Tensor | None, background_weight: float) -> torch.Tensor | None:
    """Per-pixel loss weights ``mask + background_weight * (1 - mask)``.

    Head (or brain) pixels weigh 1 and background pixels ``background_weight``, so that a slice's
    loss measures its anatomy rather than the 67-81 % of it that is background.

    Args:
        mask: ``(batch, 1, H, W)`` head mask in [0, 1], or ``None`` (every pixel in the head).
        background_weight: weight of a pixel outside the mask, in [0, 1].

    Returns:
        The weights, shaped like ``mask``; ``None`` for ``mask=None`` (all weights 1: the
        weighted losses below are then the plain means).
    """
    if not 0.0 <= background_weight <= 1.0:
        raise ValueError(f"background_weight must be in [0, 1], found {background_weight}")
    if mask is None:
        return None
    return mask + background_weight * (1.0 - mask)


def weighted_l1_loss(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over examples of each example's weighted mean absolute difference.

    For example ``n``: ``sum(w_n * |x_n - y_n|) / sum(w_n)`` over channels and pixels, with
    ``weight`` broadcast over the channels; then the mean over ``n``. An example whose weights
    are all 0 (an empty mask with background weight 0) contributes 0 and no gradient.
    ``weight=None`` is the plain mean over every element (``F.l1_loss``).

    Args:
        prediction: ``(batch, C, H, W)``.
        target: same shape.
        weight: ``(batch, 1, H, W)`` or ``(batch, C, H, W)`` non-negative weights, or ``None``.
    """
    if weight is None:
        return F.l1_loss(prediction, target)
    difference = (prediction.float() - target.float()).abs()
    weight = weight.float().expand_as(difference)
    total = (weight * difference).flatten(1).sum(dim=1)
    norm = weight.flatten(1).sum(dim=1)
    return (total / norm.clamp_min(torch.finfo(norm.dtype).eps)).mean()


def cycle_loss(
    reconstructed: torch.Tensor, original: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cycle-consistency loss of Zhu et al.: L1 between ``G_BA(G_AB(a))`` and ``a`` (weight 10).

    ``weight``: per-pixel weights of ``original`` (:func:`pixel_weights` of its mask).
    """
    return weighted_l1_loss(reconstructed, original, weight)


def identity_loss(
    same: torch.Tensor, original: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Identity loss of Zhu et al. (after Taigman et al. 2017): L1 between ``G_AB(b)`` and ``b``.

    A generator fed an image of its own output domain should leave it unchanged (weight 5, i.e.
    0.5 x the cycle weight, as in the CycleGAN code). ``weight``: per-pixel weights of ``original``.
    """
    return weighted_l1_loss(same, original, weight)


def paired_l1_loss(
    fake: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """pix2pix's supervised loss (Isola et al. 2017): L1 between ``G_AB(a)`` and its paired ``b``.

    Isola et al. weigh it 100 against an adversarial weight of 1. ``weight``: per-pixel weights
    of ``target``.
    """
    return weighted_l1_loss(fake, target, weight)


def registration_correction_loss(
    warped_fake: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """RegGAN's correction loss: L1 between ``R``-warped ``G_AB(a)`` and the misaligned ``b``.

    Kong et al. (2021) weigh it 20. ``weight``: per-pixel weights of ``target``.
    """
    return weighted_l1_loss(warped_fake, target, weight)


def smoothness_loss(flow: torch.Tensor) -> torch.Tensor:
    """RegGAN's smoothness loss: mean squared finite differences of the flow along y plus along x.

    ``mean((flow[..., 1:, :] - flow[..., :-1, :])**2) + mean((flow[..., :, 1:] - flow[..., :,
    :-1])**2)`` over batch, both flow channels and pixels, as in Kong et al. (2021), weight 10.
    Differences are between neighbouring pixels, in the flow's own units: a flow that rises by ``s``
    per pixel along one axis and is constant along the other costs ``s**2``.
    :class:`~fedsynth.common.models.registration.RegistrationNet` outputs normalised coordinates,
    where one pixel is ``2 / W``; RegGAN's network outputs pixels, so apply
    :func:`~fedsynth.common.models.registration.flow_to_pixels` first to reproduce RegGAN's
    weighting.

    Args:
        flow: ``(batch, 2, H, W)`` displacement field.
    """
    if flow.dim() != 4:
        raise ValueError(f"flow must be (batch, 2, H, W), found shape {tuple(flow.shape)}")
    d_y = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    d_x = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    return d_y.pow(2).mean() + d_x.pow(2).mean()
