"""Tests of the deterministic synthetic cross-domain benchmark."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from peft_mmap.apps.synthetic import (
    BENCHMARK_LABELS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DOMAINS,
    generate_benchmark,
    render_image,
)


def _pixels(class_name: str, domain: str, seed: int, size: int = 64) -> np.ndarray:
    """Rendered image as float array (size, size, 3)."""
    return np.asarray(render_image(class_name, domain, np.random.default_rng(seed), size), dtype=np.float32)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_catalogue() -> None:
    assert len(SYNTHETIC_CLASSES) >= 20
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    assert SYNTHETIC_DOMAINS == ("Photo", "Clipart", "Sketch", "Painting")


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_render_every_class(domain: str) -> None:
    rng = np.random.default_rng(0)
    for class_name in SYNTHETIC_CLASSES:
        image = render_image(class_name, domain, rng, size=32)
        assert image.mode == "RGB"
        assert image.size == (32, 32)
        assert np.asarray(image).std() > 5  # not blank


def test_render_is_deterministic() -> None:
    a = _pixels("house", "Photo", 3)
    assert np.array_equal(a, _pixels("house", "Photo", 3))
    assert not np.array_equal(a, _pixels("house", "Photo", 4))


def test_generate_tree_deterministic_and_cached(tmp_path: Path) -> None:
    classes, domains = ["circle", "fish", "key"], ["Photo", "Sketch"]
    root = generate_benchmark(
        tmp_path / "a", images_per_class=3, seed=7, size=32, classes=classes, domains=domains
    )
    assert root == tmp_path / "a"
    assert sorted(p.name for p in root.iterdir()) == ["Photo", "Sketch", "benchmark.json"]
    for domain, class_name in itertools.product(domains, classes):
        assert sorted(p.name for p in (root / domain / class_name).iterdir()) == ["0.png", "1.png", "2.png"]
    meta = json.loads((root / "benchmark.json").read_text())
    assert meta["seed"] == 7 and meta["size"] == 32 and meta["num_images"] == 18
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    same = generate_benchmark(
        tmp_path / "b", images_per_class=3, seed=7, size=32, classes=classes, domains=domains
    )
    assert _tree_bytes(root) == _tree_bytes(same)
    other = generate_benchmark(
        tmp_path / "c", images_per_class=3, seed=8, size=32, classes=classes, domains=domains
    )
    assert _tree_bytes(root).keys() == _tree_bytes(other).keys()
    assert all(_tree_bytes(root)[k] != v for k, v in _tree_bytes(other).items())

    # Cached: a second call with the same parameters does not touch the files.
    marker = root / "Photo" / "circle" / "0.png"
    marker.write_bytes(b"sentinel")
    generate_benchmark(root, images_per_class=3, seed=7, size=32, classes=classes, domains=domains)
    assert marker.read_bytes() == b"sentinel"
    # Different parameters regenerate the whole tree.
    generate_benchmark(root, images_per_class=2, seed=7, size=32, classes=classes, domains=domains)
    assert marker.read_bytes() != b"sentinel"
    assert not (root / "Photo" / "circle" / "2.png").exists()


def test_labels_renamed_unless_object_names(tmp_path: Path) -> None:
    """The benchmark's folders carry the `BENCHMARK_LABELS` words; ``object_names`` keeps the object names
    for the same images, and the two trees are cached apart."""
    renamed = next(iter(BENCHMARK_LABELS))
    classes = ["circle", renamed]
    kwargs = {"images_per_class": 2, "seed": 3, "size": 32, "classes": classes, "domains": ["Sketch"]}
    labelled = generate_benchmark(tmp_path / "a", **kwargs)
    named = generate_benchmark(tmp_path / "b", object_names=True, **kwargs)
    assert sorted(p.name for p in (labelled / "Sketch").iterdir()) == sorted(
        ["circle", BENCHMARK_LABELS[renamed]]
    )
    assert sorted(p.name for p in (named / "Sketch").iterdir()) == sorted(classes)
    assert (labelled / "Sketch" / BENCHMARK_LABELS[renamed] / "1.png").read_bytes() == (
        named / "Sketch" / renamed / "1.png"
    ).read_bytes()
    # Asking for the other labelling in the same folder regenerates it.
    generate_benchmark(labelled, object_names=True, **kwargs)
    assert sorted(p.name for p in (labelled / "Sketch").iterdir()) == sorted(classes)


def test_images_independent_of_subset(tmp_path: Path) -> None:
    full = generate_benchmark(
        tmp_path / "full", images_per_class=2, seed=1, size=32, classes=["star", "cup"], domains=["Clipart"]
    )
    part = generate_benchmark(
        tmp_path / "part", images_per_class=2, seed=1, size=32, classes=["cup"], domains=["Clipart"]
    )
    assert (full / "Clipart" / "cup" / "1.png").read_bytes() == (
        part / "Clipart" / "cup" / "1.png"
    ).read_bytes()


def test_incomplete_tree_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "bench"
    (root / "Photo" / "circle").mkdir(parents=True)
    (root / "Photo" / "circle" / "0.png").write_bytes(b"half written")
    generate_benchmark(root, images_per_class=1, seed=0, size=32, classes=["circle"], domains=["Photo"])
    assert (root / "Photo" / "circle" / "0.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images_per_class": 0}, "images_per_class"),
        ({"images_per_class": 1.5}, "images_per_class"),
        ({"seed": -1}, "seed"),
        ({"size": 8}, "image size"),
        ({"classes": ["circle", "unicorn"]}, "unicorn"),
        ({"classes": []}, "class name"),
        ({"classes": "circle"}, "class name"),
        ({"classes": ["circle", "circle"]}, "duplicates"),
        ({"domains": ["Photo", "Cartoon"]}, "Cartoon"),
    ],
)
def test_generate_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_benchmark(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_render_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unicorn"):
        render_image("unicorn", "Photo", rng)
    with pytest.raises(ValueError, match="Cartoon"):
        render_image("circle", "Cartoon", rng)
    with pytest.raises(ValueError, match="Generator"):
        render_image("circle", "Photo", 0)  # type: ignore[arg-type]


def test_classes_differ_more_than_instances() -> None:
    """Sketch images of one class are closer to each other than to other classes' images, despite pose changes."""
    per_class = 8
    images = np.stack(
        [[_pixels(c, "Sketch", s, 32).mean(-1) for s in range(per_class)] for c in SYNTHETIC_CLASSES]
    )
    flat = images.reshape(len(SYNTHETIC_CLASSES) * per_class, -1)
    distance = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    label = np.repeat(np.arange(len(SYNTHETIC_CLASSES)), per_class)
    same = label[:, None] == label[None, :]
    off_diagonal = ~np.eye(len(label), dtype=bool)
    within, between = distance[same & off_diagonal].mean(), distance[~same].mean()
    assert within > 1.0  # real intra-class variation
    assert between > within
    # A nearest-class-mean classifier on held-out images beats chance by far.
    means = images.mean(1)
    held_out = [
        (c, _pixels(name, "Sketch", s, 32).mean(-1))
        for c, name in enumerate(SYNTHETIC_CLASSES)
        for s in range(100, 103)
    ]
    correct = sum(int(np.argmin(np.abs(means - image).mean((1, 2))) == c) for c, image in held_out)
    assert correct / len(held_out) > 3 / len(SYNTHETIC_CLASSES)


def test_domains_differ() -> None:
    """Simple colour statistics separate the domains."""
    stats = {
        d: np.array([_stat(_pixels(c, d, s)) for c in SYNTHETIC_CLASSES[:8] for s in range(3)])
        for d in SYNTHETIC_DOMAINS
    }
    saturation = {d: v[:, 0].mean() for d, v in stats.items()}
    white = {d: v[:, 1].mean() for d, v in stats.items()}
    assert saturation["Sketch"] < 1.0  # grey strokes
    assert min(saturation["Photo"], saturation["Clipart"], saturation["Painting"]) > 10
    assert (
        white["Sketch"] > 0.8 and white["Clipart"] > white["Photo"] and white["Clipart"] > white["Painting"]
    )
    edges = {d: v[:, 2].mean() for d, v in stats.items()}
    assert edges["Painting"] < edges["Clipart"]  # blurred vs crisp outlines


def _stat(image: np.ndarray) -> tuple[float, float, float]:
    """(mean channel spread, fraction of near-white pixels, mean horizontal gradient) of an (H, W, 3) image."""
    saturation = (image.max(-1) - image.min(-1)).mean()
    near_white = (image.min(-1) > 225).mean()
    gradient = np.abs(np.diff(image.mean(-1), axis=1)).mean()
    return float(saturation), float(near_white), float(gradient)
