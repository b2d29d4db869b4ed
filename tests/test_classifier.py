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


def test_context_template_keeps_the_class_name_and_what_follows_it():
    from peft_mmap.classifier import context_template

    assert context_template("a photo of a {}.") == "{}."
    assert context_template("a sketch of a {}, drawn by hand.") == "{}, drawn by hand."
    assert context_template("{} in the wild") == "{} in the wild"
    assert context_template("a photo of a {}.", kept_words="of a") == "of a {}."


def test_placeholders_follow_sos_one_token_each(tokenizer):
    import pytest

    from peft_mmap.classifier import tokenize_with_placeholders

    tokens = tokenize_with_placeholders(tokenizer, ["ab.", "b."], 3, max_length=20)
    x = tokenizer.convert_tokens_to_ids("x</w>")
    assert tokens["input_ids"].tolist() == [[97, x, x, x, 0, 41, 76, 98], [97, x, x, x, 41, 76, 98, 98]]
    assert tokens["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    with pytest.raises(
        ValueError, match=r"3 placeholder tokens \+ class prompts of up to 5 tokens .* 7 positions"
    ):
        tokenize_with_placeholders(tokenizer, ["ab.", "b."], 3, max_length=7)
