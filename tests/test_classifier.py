"""Loading a checkpoint's processor: the image backend is chosen explicitly."""

from __future__ import annotations

import warnings

from peft_mmap.classifier import load_clip_processor


def test_processor_uses_the_pil_backend_quietly(workspace):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor = load_clip_processor(workspace / "model")
    assert (
        processor.image_processor.backend == "pil"
    )  # the same pixels whether torchvision is installed or not
    assert processor.image_processor.crop_size["height"] == 16
