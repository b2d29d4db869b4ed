"""Random resized crop + flip on pixel batches: deterministic per seed, shape-preserving, real crops."""

from __future__ import annotations

import torch

from peft_mmap.augment import crop_flip_params, random_resized_crop_flip


def test_params_are_deterministic_per_seed() -> None:
    assert torch.equal(crop_flip_params(8, [1, 0, 2, 3]), crop_flip_params(8, [1, 0, 2, 3]))
    assert not torch.equal(crop_flip_params(8, [1, 0, 2, 3]), crop_flip_params(8, [1, 0, 2, 4]))


def test_params_describe_crops_inside_the_image() -> None:
    theta = crop_flip_params(2000, [0])
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (width <= 1).all() and (height <= 1).all()
    # The crop's edges stay inside [-1, 1].
    assert (theta[:, 0, 2].abs() + width <= 1 + 1e-6).all()
    assert (theta[:, 1, 2].abs() + height <= 1 + 1e-6).all()
    flips = (theta[:, 0, 0] < 0).float().mean()
    assert 0.4 < flips < 0.6


def test_identity_and_flip_matrices() -> None:
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[-1.0, 0, 0], [0, 1, 0]]])
    out = random_resized_crop_flip(pixels, identity)
    assert out.shape == pixels.shape
    torch.testing.assert_close(out[0], pixels[0])
    torch.testing.assert_close(out[1], pixels[1].flip(-1))


def test_crops_change_images_but_keep_shape() -> None:
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 16, 16)
    out = random_resized_crop_flip(pixels, crop_flip_params(4, [5]))
    assert out.shape == pixels.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, pixels)
