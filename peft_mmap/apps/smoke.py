"""Inputs of the real-shape smoke runs, built offline: a random-weight CLIP saved as a model folder, and a small
generated image folder in a dataset's layout (``SMOKE=1 examples/officehome.sh``, ``examples/minidomainnet.sh``,
``benchmarks/gpu.sh``).

The model folder is what ``--model`` takes for a real checkpoint: ``config.json`` and ``model.safetensors`` of a
``CLIPModel`` with random weights and the shapes of an OpenAI architecture (`peft_mmap.apps.params.clip_config`;
``tiny`` for quick tests of the scripts), the shipped tiny CLIP's CLIP tokenizer (77 positions, as OpenAI's; its
special tokens set in the text config) and CLIP's image processor at the architecture's image size. The image folder has the dataset's domain folders and
a few of its class folders, each with a few JPEGs of real-world sizes (300 x 224, 224 x 300, 320 x 240);
MiniDomainNet's also has its ``splits_mini/<domain>_{train,test}.txt`` files. Everything is drawn from
``seed``: the same call writes the same model and the same images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from ..base_models import TINY_CLIP_PATH
from ..data import DOMAINNET_DOMAINS
from ..files import new_file_mode, replace_directory
from .perf import perf_clip_config
from .tiny_clip import clip_image_processor

MODEL_DIR, DATA_DIR = "model", "data"
"""The two folders `write_smoke_inputs` writes under its output folder."""
MINI_SPLIT_DIR = "splits_mini"
"""MiniDomainNet's split-file folder under the DomainNet root (Dassl's layout)."""
TEXT_POSITIONS = 77
"""CLIP's text context length (every OpenAI checkpoint's)."""
#: Per layout: the dataset's domain folders and some of its class folders, named as the dataset names them.
SMOKE_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "officehome": (
        ("Art", "Clipart", "Product", "Real World"),
        ("Alarm_Clock", "Desk_Lamp", "Push_Pin", "Trash_Can"),
    ),
    "domainnet": (DOMAINNET_DOMAINS, ("aircraft_carrier", "teddy-bear", "The_Eiffel_Tower", "zebra")),
}
#: Image sizes (width, height), taken in turn.
IMAGE_SIZES = ((300, 224), (224, 300), (320, 240))


@dataclass(frozen=True)
class SmokeInputs:
    """Where `write_smoke_inputs` put the model and the data (``split_dir``: MiniDomainNet's split files)."""

    model: Path
    data: Path
    split_dir: Path | None


def save_random_clip(output: str | os.PathLike, arch: str = "vit-b16", seed: int = 0) -> Path:
    """Write a random-weight ``CLIPModel`` of ``arch``'s shapes (an OpenAI architecture of
    `peft_mmap.options.ARCHS`, or ``tiny``: `peft_mmap.apps.perf.perf_clip_config`) with a CLIP tokenizer and
    image processor to ``output`` (replaced if it exists), loadable with ``from_pretrained`` offline. Returns
    ``output``.

    Raises:
        ValueError: an unknown ``arch``.
    """
    config = perf_clip_config(arch)
    tokenizer = CLIPTokenizer.from_pretrained(TINY_CLIP_PATH, model_max_length=TEXT_POSITIONS)
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id  # the text tower pools at this token
    config.text_config.pad_token_id = tokenizer.pad_token_id
    processor = CLIPProcessor(
        image_processor=clip_image_processor(config.vision_config.image_size), tokenizer=tokenizer
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, as a Hub checkpoint has
        mode = new_file_mode(folder)
        for file in folder.iterdir():
            file.chmod(mode)  # safetensors creates its file with mode 0o600

    return replace_directory(output, write)


def smoke_image(seed: int, domain: int, label: int, index: int) -> Image.Image:
    """A deterministic RGB image (smooth colour noise tinted by its class) of size ``IMAGE_SIZES[index % 3]``."""
    rng = np.random.default_rng([seed, domain, label, index])
    width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    tint = np.roll(np.array([220, 60, 40], dtype=np.float32), label)
    pixels = 0.6 * np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)) + 0.4 * tint
    return Image.fromarray(pixels.round().astype(np.uint8))


def write_smoke_images(
    output: str | os.PathLike, layout: str, classes: int = 2, images_per_class: int = 2, seed: int = 0
) -> Path:
    """Write ``<output>/<domain>/<class>/*.jpg`` (replaced if it exists) for every domain of ``layout``
    (``officehome`` or ``domainnet``) and its first ``classes`` classes of `SMOKE_LAYOUTS`, with
    ``images_per_class`` images each; ``domainnet`` also gets ``splits_mini/<domain>_train.txt`` (each class's
    first image) and ``<domain>_test.txt`` (the others), lines ``<domain>/<class>/<file> <label>``. Returns
    ``output``.

    Raises:
        ValueError: an unknown layout, more classes than it lists, or fewer than 2 images per class.
    """
    if layout not in SMOKE_LAYOUTS:
        raise ValueError(f"Unknown smoke layout {layout!r}; expected one of {sorted(SMOKE_LAYOUTS)}.")
    domains, names = SMOKE_LAYOUTS[layout]
    if not 1 <= classes <= len(names):
        raise ValueError(f"classes must be between 1 and {len(names)} for {layout}, got {classes}.")
    if images_per_class < 2:
        raise ValueError(
            f"images_per_class must be at least 2 (one to train, one to test), got {images_per_class}."
        )

    def write(folder: Path) -> None:
        splits: dict[str, list[str]] = {}
        for d, domain in enumerate(domains):
            for label, name in enumerate(names[:classes]):
                (folder / domain / name).mkdir(parents=True)
                for i in range(images_per_class):
                    relative = f"{domain}/{name}/{domain}_{label:03d}_{i:06d}.jpg"
                    smoke_image(seed, d, label, i).save(folder / relative, quality=90)
                    part = "train" if i == 0 else "test"
                    splits.setdefault(f"{domain}_{part}.txt", []).append(f"{relative} {label}\n")
        if layout == "domainnet":
            (folder / MINI_SPLIT_DIR).mkdir()
            for file, lines in splits.items():
                (folder / MINI_SPLIT_DIR / file).write_text("".join(lines), encoding="utf-8")

    return replace_directory(output, write)


def write_smoke_inputs(
    output: str | os.PathLike,
    layout: str,
    arch: str = "vit-b16",
    classes: int = 2,
    images_per_class: int = 2,
    seed: int = 0,
) -> SmokeInputs:
    """`save_random_clip` into ``<output>/model`` and `write_smoke_images` into ``<output>/data``.

    Raises:
        ValueError: an unknown ``arch`` or bad image-folder arguments, before anything is written.
    """
    perf_clip_config(arch)  # refuses an unknown arch
    data = write_smoke_images(Path(output) / DATA_DIR, layout, classes, images_per_class, seed)
    model = save_random_clip(Path(output) / MODEL_DIR, arch, seed)
    return SmokeInputs(model, data, data / MINI_SPLIT_DIR if layout == "domainnet" else None)
