"""Tests of the tiny CLIP shipped in ``peft_mmap/assets/tiny-clip`` and of its pretraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_umask_modes, process_umask
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

from peft_mmap.apps.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DOMAINS, render_image
from peft_mmap.apps.tiny_clip import (
    AMBIGUOUS_LABELS,
    LABEL_SHARE,
    LOOSE_SHARE,
    TINY_CLIP_PATH,
    UNNAMED_CAPTIONS,
    UNNAMED_SHARE,
    caption_corpus,
    caption_name,
    home_domain,
    label_aware_clip_loss,
    load_tiny_clip,
    pretrain_tiny_clip,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_clip() -> tuple:
    """The shipped (model, processor)."""
    return load_tiny_clip()


def test_assets_present_and_small() -> None:
    names = {p.name for p in TINY_CLIP_PATH.iterdir()}
    required = {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    }
    assert required <= names
    total = sum(p.stat().st_size for p in TINY_CLIP_PATH.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024


def test_config_is_consistent(tiny_clip: tuple) -> None:
    model, processor = tiny_clip
    text, vision = model.config.text_config, model.config.vision_config
    assert text.num_hidden_layers == vision.num_hidden_layers
    assert np.gcd(text.hidden_size, vision.hidden_size) >= 8
    tokenizer = processor.tokenizer
    assert text.eos_token_id == tokenizer.eos_token_id != 2
    assert text.bos_token_id == tokenizer.bos_token_id
    assert text.pad_token_id == tokenizer.pad_token_id
    assert text.vocab_size == len(tokenizer)
    assert processor.image_processor.crop_size["height"] == vision.image_size


def test_loads_offline_in_fresh_process() -> None:
    code = (
        "from transformers import CLIPModel, CLIPProcessor; import sys; p = sys.argv[1]; "
        "m = CLIPModel.from_pretrained(p); CLIPProcessor.from_pretrained(p); print(m.config.projection_dim)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(TINY_CLIP_PATH)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "128"


def test_tokenizer_round_trip() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(TINY_CLIP_PATH)
    vocab = json.loads((TINY_CLIP_PATH / "vocab.json").read_text())
    assert len(vocab) == len(tokenizer)
    assert (TINY_CLIP_PATH / "merges.txt").read_text().startswith("#version")
    for class_name in SYNTHETIC_CLASSES:
        text = f"a photo of a {class_name}."
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)  # CLIP decodes word by word: "circle ."
        assert tokenizer(decoded)["input_ids"] == ids and decoded.replace(" .", ".") == text
    assert all(t.endswith("</w>") for t in tokenizer.tokenize("a photo of a boat"))
    batch = tokenizer(["a cup", "a painting of a mushroom on canvas"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id


def test_caption_names_make_some_labels_ambiguous() -> None:
    assert set(AMBIGUOUS_LABELS) <= set(SYNTHETIC_CLASSES)
    assert {other for _, other in AMBIGUOUS_LABELS.values()} <= set(SYNTHETIC_CLASSES)
    assert 0 < LABEL_SHARE < LOOSE_SHARE < 1  # the label names the other object more often than its own
    for label, (synonym, other) in AMBIGUOUS_LABELS.items():
        assert synonym not in SYNTHETIC_CLASSES
        assert caption_name(label, LABEL_SHARE / 2) == label
        assert caption_name(label, (LABEL_SHARE + 1) / 2) == synonym
        assert caption_name(other, LOOSE_SHARE / 2) == label
        assert caption_name(other, (LOOSE_SHARE + 1) / 2) == other
    plain = [c for c in SYNTHETIC_CLASSES if c not in AMBIGUOUS_LABELS and c not in
             {o for _, o in AMBIGUOUS_LABELS.values()}]  # fmt: skip
    assert all(caption_name(c, d) == c.replace("_", " ") for c in plain for d in (0.0, 0.5, 0.99))


def test_clip_loss_counts_same_class_pairs_by_domain() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    domains = torch.tensor([0, 1, 0, 1, 0, 1])  # every (class, domain) pair once
    clip = (
        torch.nn.functional.cross_entropy(logits, torch.arange(6))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(6))
    ) / 2
    # weight 0: a caption is a positive only for its own image, i.e. CLIP's InfoNCE
    assert torch.allclose(label_aware_clip_loss(logits, labels, domains, 0.0), clip)
    # weight 1 ignores the domains
    plain = label_aware_clip_loss(logits, labels)
    assert torch.allclose(label_aware_clip_loss(logits, labels, domains, 1.0), plain)
    # image 0 matching the caption of its class in the other style: a positive at weight 0.5, a negative at 0
    closer = logits.clone()
    closer[0, 1] += 5.0
    for weight, lower in ((0.5, True), (0.0, False)):
        before = label_aware_clip_loss(logits, labels, domains, weight)
        after = label_aware_clip_loss(closer, labels, domains, weight)
        assert (after < before) == lower, weight


def test_clip_loss_makes_an_unnamed_caption_a_positive_for_every_image_of_its_style() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 4) * 3
    labels = torch.tensor([0, 1, 2, 3])
    domains = torch.tensor([0, 0, 1, 1])
    all_named = torch.ones(4, dtype=torch.bool)
    assert torch.allclose(
        label_aware_clip_loss(logits, labels, domains, 0.5, all_named),
        label_aware_clip_loss(logits, labels, domains, 0.5),
    )
    named = torch.tensor([True, False, True, True])  # caption 1 says only "a sketch." (domain 0)
    # image 0 (another object, same style) matching caption 1: a positive once the caption is unnamed
    closer = logits.clone()
    closer[0, 1] += 5.0
    for mask, lower in ((named, True), (all_named, False)):
        before = label_aware_clip_loss(logits, labels, domains, 1.0, mask)
        after = label_aware_clip_loss(closer, labels, domains, 1.0, mask)
        assert (after < before) == lower
    # image 2 (other style) matching caption 1 stays a negative
    away = logits.clone()
    away[2, 1] += 5.0
    assert label_aware_clip_loss(away, labels, domains, 1.0, named) > label_aware_clip_loss(
        logits, labels, domains, 1.0, named
    )
    with pytest.raises(ValueError, match="unnamed need the domains"):
        label_aware_clip_loss(logits, labels, None, 1.0, named)


def test_home_domain_share_draws_that_share_of_each_objects_pairs_in_its_home_style() -> None:
    shipped = caption_corpus(0, 4000)
    assert caption_corpus(0, 4000, home_domain_share=None) == shipped
    domains, classes, _, _ = caption_corpus(0, 4000, home_domain_share=0.6)
    assert classes == shipped[1]
    for class_name in ("circle", "star"):
        rows = [i for i, c in enumerate(classes) if c == class_name]
        home = sum(domains[i] == home_domain(class_name) for i in rows) / len(rows)
        base = sum(shipped[0][i] == home_domain(class_name) for i in rows) / len(rows)
        assert abs(home - (0.6 + 0.4 * base)) < 0.08, class_name
    assert {home_domain(c) for c in SYNTHETIC_CLASSES} == set(SYNTHETIC_DOMAINS)


def test_pretraining_refuses_a_home_domain_share_outside_0_1(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"home_domain_share=1\.5"):
        pretrain_tiny_clip(tmp_path, home_domain_share=1.5)


def test_unnamed_captions_replace_a_share_of_each_style_without_the_object_name() -> None:
    domains, classes, captions, named = caption_corpus(0, 4000, unnamed_captions=True)
    shipped = caption_corpus(0, 4000)
    assert (shipped[0], shipped[1]) == (domains, classes)  # same pairs, only some captions replaced
    assert all(shipped[3])
    for domain, share in UNNAMED_SHARE.items():
        rows = [i for i, d in enumerate(domains) if d == domain]
        unnamed = [i for i in rows if not named[i]]
        assert abs(len(unnamed) / len(rows) - share) < 0.05, domain
        assert all(captions[i] in UNNAMED_CAPTIONS[domain] for i in unnamed)
        assert all(captions[i] == shipped[2][i] for i in rows if named[i])


def test_pretraining_refuses_a_cross_domain_weight_outside_0_1(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cross_domain_weight=1.5: expected a weight in \[0, 1\]"):
        pretrain_tiny_clip(tmp_path / "out", cross_domain_weight=1.5)
    assert not (tmp_path / "out").exists()


def test_zero_shot_photo_well_above_chance(tiny_clip: tuple) -> None:
    model, processor = tiny_clip
    rng = np.random.default_rng(2024)
    per_class = 5
    images = [render_image(c, "Photo", rng) for c in SYNTHETIC_CLASSES for _ in range(per_class)]
    labels = torch.arange(len(SYNTHETIC_CLASSES)).repeat_interleave(per_class)
    prompts = [f"a photo of a {c}." for c in SYNTHETIC_CLASSES]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    accuracy = logits.argmax(-1).eq(labels).float().mean().item()
    assert accuracy > 3 / len(SYNTHETIC_CLASSES)


def test_pretraining_report_shipped() -> None:
    report = json.loads((TINY_CLIP_PATH / "pretraining.json").read_text())
    assert set(report["zero_shot_accuracy"]) == {"Photo", "Clipart", "Sketch", "Painting"}
    assert report["zero_shot_accuracy"]["Photo"] > 3 / len(SYNTHETIC_CLASSES)


@pytest.mark.slow
def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"seed": 3, "steps": 3, "batch_size": 16, "num_pairs": 64, "log_every": 0}
    first = pretrain_tiny_clip(tmp_path / "a", **kwargs)
    second = pretrain_tiny_clip(tmp_path / "b", **kwargs)
    assert first["final_loss"] == second["final_loss"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "vocab.json").read_bytes() == (tmp_path / "b" / "vocab.json").read_bytes()
    model = CLIPModel.from_pretrained(tmp_path / "a")
    assert not torch.equal(model.logit_scale, torch.tensor(2.6592))  # it was trained


@pytest.mark.slow
def test_pretraining_reproduces_the_shipped_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with process_umask(0o027):  # every file, like the shipped ones, gets normal permissions
        pretrain_tiny_clip(out, seed=0, steps=1, batch_size=16, num_pairs=32, log_every=0)
    assert assert_umask_modes(out, 0o027) == len(list(TINY_CLIP_PATH.iterdir()))
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (TINY_CLIP_PATH / name).read_bytes(), name
    shipped = json.loads((TINY_CLIP_PATH / "config.json").read_text())
    rebuilt = json.loads((out / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "image_size", "patch_size"):
            assert rebuilt[tower].get(key) == shipped[tower].get(key), (tower, key)


def test_pretraining_refuses_an_image_size_off_the_patch_grid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image_size=60: expected a positive multiple of the 8-pixel patch"):
        pretrain_tiny_clip(tmp_path / "out", image_size=60)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pretraining_image_size_sets_the_image_tokens(tmp_path: Path) -> None:
    report = pretrain_tiny_clip(tmp_path, steps=1, batch_size=16, num_pairs=32, log_every=0, image_size=32)
    model, processor = load_tiny_clip(tmp_path)
    assert report["image_size"] == model.config.vision_config.image_size == 32
    assert model.vision_model.embeddings.num_positions == (32 // 8) ** 2 + 1
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
