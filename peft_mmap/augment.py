"""Training-time augmentation on preprocessed pixel batches: random resized crop and horizontal flip.

The augmentation the CoOp, MaPLe and CLIP-Adapter papers train with, applied to the already normalised
``(B, 3, H, W)`` tensors the datasets cache, so it costs one ``grid_sample`` per batch. Each batch's crops
are drawn from a generator seeded by the caller (the trainer seeds it with the run seed, epoch, task and
step), so training stays reproducible and resumable without touching the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Area of the crop relative to the image, as in torchvision's ``RandomResizedCrop`` default (0.08, 1)
#: narrowed to what a 6-shot task can afford to lose.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def crop_flip_params(batch: int, seed: Sequence[int]) -> torch.Tensor:
    """``(batch, 2, 3)`` affine sampling matrices of random resized crops with random horizontal flips.

    A row maps output coordinates in ``[-1, 1]`` to input coordinates: width ``w`` and height ``h`` of the
    crop (relative), its centre, and the sign of ``w`` for the flip. ``seed`` seeds a numpy generator.
    """
    rng = np.random.default_rng(list(seed))
    area = rng.uniform(*CROP_SCALE, size=batch)
    log_ratio = rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), size=batch)
    w = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)
    h = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
    cx = rng.uniform(-1.0, 1.0, size=batch) * (1.0 - w)
    cy = rng.uniform(-1.0, 1.0, size=batch) * (1.0 - h)
    flip = np.where(rng.random(batch) < 0.5, -1.0, 1.0)
    zeros = np.zeros(batch)
    theta = np.stack([np.stack([w * flip, zeros, cx], 1), np.stack([zeros, h, cy], 1)], 1)
    return torch.from_numpy(theta).float()


def random_resized_crop_flip(pixels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply `crop_flip_params` matrices ``theta`` ``(B, 2, 3)`` to ``pixels`` ``(B, 3, H, W)`` -> same shape."""
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
