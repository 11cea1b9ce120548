"""The image pool of CycleGAN: a history of generated images shown to the discriminators."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from fedsynth.common.training.state import as_random_state


class ImagePool:
    """History of generated images (Shrivastava et al. 2017), as used by CycleGAN.

    With probability 1/2 a query returns a stored older fake (and stores the new one in its place),
    otherwise the new fake; the discriminator thus sees a history, which damps oscillation.
    ``size == 0`` turns the pool off. The pool mixes images across steps, so it is forced off under
    differential privacy.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "images": [t.cpu() for t in self.images],
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.size = int(state["size"])
        self.images = [t.to(device) for t in state["images"]]
        self.rng.setstate(as_random_state(state["rng"]))
