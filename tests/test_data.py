"""Tests for peft_mmap.data: folder layouts, k-shot splits, split files, unreadable images, datasets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from peft_mmap.data import (
    ImageClassificationDataset,
    Sample,
    TaskFolder,
    check_layout,
    class_display_name,
    domainnet,
    few_shot_split,
    filter_readable,
    find_unreadable_images,
    load_rgb,
    load_split,
    load_task_folders,
    office_home,
    save_split,
    scan_image_folder,
    task_name,
    validation_split,
)


def _png(path: Path, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _make_tree(root: Path, layout: dict[str, dict[str, int]], ext: str = ".png") -> Path:
    """``layout`` maps task folder -> class folder -> number of images."""
    seed = 0
    for task, classes in layout.items():
        for cls, count in classes.items():
            for i in range(count):
                seed += 1
                _png(root / task / cls / f"img{i:02d}{ext}", seed)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(
        tmp_path / "data",
        {
            "beta": {"Alarm_Clock": 5, "TV": 4, "bike": 6},
            "alpha": {"Alarm_Clock": 5, "TV": 4, "bike": 6},
        },
    )


@pytest.fixture
def processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("Alarm_Clock", "alarm clock"),
        ("Real_World", "real world"),
        ("real world", "real world"),
        ("TV", "tv"),
        ("ice-cream__cone", "ice cream cone"),
        ("  Flip  Flops ", "flip flops"),
    ],
)
def test_class_display_name(folder, expected):
    assert class_display_name(folder) == expected


def test_task_name_normalises_and_rejects_unsafe():
    assert task_name("Real World") == "real_world"
    assert task_name("Clipart") == "clipart"
    for bad in ("..", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="task name"):
            task_name(bad)


def test_scan_image_folder(tree: Path):
    (tree / "alpha" / "bike" / "notes.txt").write_text("not an image")
    _png(tree / "alpha" / "bike" / "UPPER.PNG", 99)
    (tree / "README.txt").write_text("a file at the root is ignored")
    tasks = scan_image_folder(tree)
    assert list(tasks) == ["alpha", "beta"]
    alpha = tasks["alpha"]
    assert isinstance(alpha, TaskFolder)
    assert alpha.root == tree / "alpha"
    assert alpha.class_dirs == ["Alarm_Clock", "TV", "bike"]
    assert alpha.classnames == ["alarm clock", "tv", "bike"]
    assert [len(images) for images in alpha.images] == [5, 4, 7]
    assert alpha.images[2][0].name == "UPPER.PNG"
    assert all(images == sorted(images) for images in alpha.images)
    assert list(scan_image_folder(tree, tasks=["beta", "alpha"])) == ["beta", "alpha"]


def test_scan_errors(tmp_path: Path, tree: Path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"'gamma' not found.*found: \['alpha', 'beta'\]"):
        scan_image_folder(tree, tasks=["gamma"])
    (tree / "alpha" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"empty_class has no images"):
        scan_image_folder(tree)
    (tree / "alpha" / "empty_class").rmdir()
    (tree / "no_classes").mkdir()
    with pytest.raises(ValueError, match="no_classes has no class folders"):
        scan_image_folder(tree)
    assert list(scan_image_folder(tree, tasks=["alpha"])) == ["alpha"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no task folders"):
        scan_image_folder(empty)


def test_office_home_layout(tmp_path: Path):
    classes = {"Alarm_Clock": 3, "Backpack": 3}
    root = _make_tree(
        tmp_path / "OfficeHome",
        {"Art": classes, "Clipart": classes, "Product": classes, "Real World": classes},
        ext=".jpg",
    )
    tasks = office_home(root)
    assert list(tasks) == ["art", "clipart", "product", "real_world"]
    assert tasks["real_world"].root == root / "Real World"
    assert tasks["real_world"].classnames == ["alarm clock", "backpack"]
    assert list(office_home(root, domains=["real_world", "art"])) == ["real_world", "art"]
    (root / "Real World").rename(root / "Real_World")
    assert office_home(root)["real_world"].root == root / "Real_World"
    (root / "Real_World").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="'real_world' not found"):
        office_home(root)


def test_named_layouts_refuse_other_data(tmp_path: Path, tree: Path):
    check_layout("officehome", {"art": ["alarm clock", "tv"], "real_world": ["bike"]}, tmp_path)
    check_layout("domainnet", {"quickdraw": ["zebra"]}, tmp_path)
    check_layout("generic", {"anything": ["red"]}, tmp_path)
    with pytest.raises(
        ValueError, match=r"task 'art' has classes that are not Office-Home classes, e.g. \['red'\]"
    ):
        check_layout("officehome", {"art": ["alarm clock", "red"]}, tmp_path)
    with pytest.raises(ValueError, match="task 'alpha' is not a officehome domain"):
        check_layout("officehome", {"alpha": ["tv"]}, tmp_path)
    with pytest.raises(ValueError, match="task 'photo' is not a domainnet domain"):
        check_layout("domainnet", {"photo": ["zebra"]}, tmp_path)
    with pytest.raises(ValueError, match="Unknown dataset layout 'mnist'"):
        check_layout("mnist", {}, tmp_path)
    (tree / "alpha").rename(tree / "Art")
    (tree / "Art" / "bike").rename(tree / "Art" / "unicycle")
    with pytest.raises(
        ValueError, match=r"not Office-Home classes, e.g. \['unicycle'\]; use --layout generic"
    ):
        load_task_folders(tree, "officehome", tasks=["art"])


def _write_split_files(root: Path, split_dir: Path) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for domain in ("clipart", "sketch"):
        train = [f"{domain}/aircraft_carrier/img00.png 0", f"{domain}/zebra/img00.png 1"]
        test = [f"{domain}/aircraft_carrier/img01.png 0", f"{domain}/zebra/img01.png 1", ""]
        (split_dir / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        (split_dir / f"{domain}_test.txt").write_text("\n".join(test) + "\n")


def test_domainnet_with_split_files(tmp_path: Path):
    classes = {"aircraft_carrier": 3, "zebra": 3, "unlisted": 2}
    root = _make_tree(tmp_path / "domainnet", {"clipart": classes, "sketch": classes})
    split_dir = tmp_path / "splits_mini"
    _write_split_files(root, split_dir)
    tasks = domainnet(root, split_dir, domains=("clipart", "sketch"))
    assert list(tasks) == ["clipart", "sketch"]
    assert tasks["sketch"].class_dirs == ["aircraft_carrier", "zebra"]
    assert tasks["sketch"].classnames == ["aircraft carrier", "zebra"]
    listed = [[p.name for p in images] for images in tasks["clipart"].images]
    assert listed == [["img00.png", "img01.png"]] * 2
    # without split files every image in the folders is used
    scanned = domainnet(root, domains=("clipart", "sketch"))
    assert scanned["clipart"].class_dirs == ["aircraft_carrier", "unlisted", "zebra"]
    restricted = domainnet(root, domains=("sketch",), classes=["zebra", "unlisted"])
    assert restricted["sketch"].class_dirs == ["unlisted", "zebra"]
    with pytest.raises(ValueError, match=r"no class folder\(s\) \['lion'\]"):
        domainnet(root, domains=("sketch",), classes=["lion"])


@pytest.mark.parametrize(
    ("line", "error", "match"),
    [
        ("clipart/zebra/img00.png", ValueError, r"clipart_train.txt:2: expected 'relative/path.jpg label'"),
        ("clipart/zebra/img00.png x", ValueError, r"clipart_train.txt:2: expected"),
        ("/abs/zebra/img00.png 1", ValueError, r"clipart_train.txt:2: expected a relative path"),
        ("../clipart/zebra/img00.png 1", ValueError, r"clipart_train.txt:2: expected a relative path"),
        ("clipart/zebra/img99.png 1", FileNotFoundError, r"clipart_train.txt:2: image .*img99.png does not"),
        ("clipart/zebra/img02.png 0", ValueError, r"'zebra' has label 0 but label 1"),
    ],
)
def test_domainnet_split_file_errors(tmp_path: Path, line, error, match):
    root = _make_tree(tmp_path / "dn", {"clipart": {"aircraft_carrier": 3, "zebra": 3}})
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "clipart_train.txt").write_text(f"clipart/zebra/img00.png 1\n{line}\n")
    (split_dir / "clipart_test.txt").write_text("clipart/aircraft_carrier/img00.png 0\n")
    with pytest.raises(error, match=match):
        domainnet(root, split_dir, domains=("clipart",))


def test_domainnet_missing_split_file_and_root(tmp_path: Path):
    root = _make_tree(tmp_path / "dn", {"clipart": {"zebra": 2}})
    with pytest.raises(FileNotFoundError, match=r"clipart_train\.txt"):
        domainnet(root, tmp_path, domains=("clipart",))
    with pytest.raises(FileNotFoundError, match="DomainNet root"):
        domainnet(tmp_path / "nope")


def _flatten(split) -> set[tuple[Path, int]]:
    return {(s.path, s.label) for s in split.train} | {(s.path, s.label) for s in split.test}


def test_few_shot_split_properties(tree: Path):
    tasks = scan_image_folder(tree)
    splits = few_shot_split(tasks, shots=2, seed=3)
    assert list(splits) == list(tasks)
    for name, split in splits.items():
        task = tasks[name]
        assert split.name == name and split.classnames == task.classnames
        everything = {(p, label) for label, images in enumerate(task.images) for p in images}
        assert {(s.path, s.label) for s in split.train}.isdisjoint({(s.path, s.label) for s in split.test})
        assert _flatten(split) == everything
        for label, images in enumerate(task.images):
            assert sum(s.label == label for s in split.train) == 2
            assert sum(s.label == label for s in split.test) == len(images) - 2
        assert split.train == sorted(split.train, key=lambda s: (s.label, s.path))
        assert split.test == sorted(split.test, key=lambda s: (s.label, s.path))


def test_few_shot_split_reproducible_and_order_independent(tree: Path):
    tasks = scan_image_folder(tree)
    first = few_shot_split(tasks, shots=2, seed=0)
    assert few_shot_split(tasks, shots=2, seed=0) == first
    reordered = scan_image_folder(tree, tasks=["beta", "alpha"])
    assert few_shot_split(reordered, shots=2, seed=0)["alpha"] == first["alpha"]
    alone = scan_image_folder(tree, tasks=["beta"])
    assert few_shot_split(alone, shots=2, seed=0)["beta"] == first["beta"]
    others = [few_shot_split(tasks, shots=2, seed=s) for s in (1, 2, 3)]
    assert any(o["alpha"].train != first["alpha"].train for o in others)


def test_few_shot_split_fraction(tree: Path):
    tasks = scan_image_folder(tree)  # classes of 5, 4 and 6 images
    splits = few_shot_split(tasks, fraction=0.5, seed=0)
    counts = [sum(s.label == label for s in splits["alpha"].train) for label in range(3)]
    assert counts == [round(0.5 * 5), round(0.5 * 4), round(0.5 * 6)] == [2, 2, 3]
    tiny = few_shot_split(tasks, fraction=0.01, seed=0)
    assert [sum(s.label == label for s in tiny["beta"].train) for label in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"'TV': 4 training image\(s\).*fraction=0.9.*only 4 available"):
        few_shot_split(tasks, fraction=0.9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of shots or fraction"),
        ({"shots": 1, "fraction": 0.1}, "exactly one of shots or fraction"),
        ({"shots": 0}, "positive integer"),
        ({"shots": 1.5}, "positive integer"),
        ({"shots": True}, "positive integer"),
        ({"fraction": 0.0}, "strictly between 0 and 1"),
        ({"fraction": 1.0}, "strictly between 0 and 1"),
        ({"fraction": "0.1"}, "strictly between 0 and 1"),
        ({"shots": 1, "seed": "0"}, "seed must be an integer"),
    ],
)
def test_few_shot_split_bad_arguments(tree: Path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        few_shot_split(scan_image_folder(tree), **kwargs)


def test_few_shot_split_too_many_shots(tree: Path):
    tasks = scan_image_folder(tree)
    assert few_shot_split(tasks, shots=3)  # TV has 4 images: 3 train + 1 test is fine
    with pytest.raises(ValueError, match=r"'alpha', class 'TV': 4 training image\(s\).*only 4 available"):
        few_shot_split(tasks, shots=4)
    with pytest.raises(ValueError, match="tasks is empty"):
        few_shot_split({}, shots=1)


def test_save_load_split_round_trip(tree: Path, tmp_path: Path):
    splits = few_shot_split(scan_image_folder(tree), shots=2, seed=5)
    path = save_split(splits, tmp_path / "out" / "split.json", tree)
    assert path == tmp_path / "out" / "split.json"
    data = json.loads(path.read_text())
    assert list(data["tasks"]) == ["alpha", "beta"]
    first = data["tasks"]["alpha"]["train"][0]
    assert first[0] == "alpha/Alarm_Clock/" + first[0].rsplit("/", 1)[1] and first[1] == 0
    assert not any(Path(rel).is_absolute() for rel, _ in data["tasks"]["beta"]["test"])
    assert load_split(path, tree) == splits
    # a moved data root loads the same split
    moved = tmp_path / "moved"
    tree.rename(moved)
    loaded = load_split(path, moved)
    assert [s.path.relative_to(moved) for s in loaded["beta"].test] == [
        s.path.relative_to(tree) for s in splits["beta"].test
    ]


def test_save_split_rejects_images_outside_root(tree: Path, tmp_path: Path):
    splits = few_shot_split(scan_image_folder(tree), shots=1)
    with pytest.raises(ValueError, match="not inside the data root"):
        save_split(splits, tmp_path / "split.json", tree / "alpha")
    assert not (tmp_path / "split.json").exists()


def _alpha(data: dict, part: str) -> list:
    return data["tasks"]["alpha"][part]


def _corrupt(path: Path, mutate) -> Path:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: d.update(format="other"), ValueError, "is not a peft_mmap.split file"),
        (lambda d: d.update(version=99), ValueError, "version 99"),
        (lambda d: d.update(tasks={}), ValueError, "non-empty object"),
        (lambda d: d["tasks"].update({"../x": d["tasks"]["alpha"]}), ValueError, "Invalid task name"),
        (lambda d: d["tasks"]["alpha"].update(classnames="tv"), ValueError, "'classnames' must be"),
        (lambda d: _alpha(d, "train").append(["alpha/TV/img00.png"]), ValueError, "must be"),
        (lambda d: _alpha(d, "train").append(["alpha/TV/img00.png", "1"]), ValueError, "must be"),
        (lambda d: _alpha(d, "train").append(["alpha/TV/img00.png", 7]), ValueError, "out of range"),
        (lambda d: _alpha(d, "test").append(["/etc/passwd", 0]), ValueError, "relative"),
        (lambda d: _alpha(d, "test").append(["alpha/TV/gone.png", 1]), FileNotFoundError, "gone.png"),
        (lambda d: _alpha(d, "test").append(_alpha(d, "train")[0]), ValueError, "both"),
    ],
)
def test_load_split_validation(tree: Path, tmp_path: Path, mutate, error, match):
    path = save_split(few_shot_split(scan_image_folder(tree), shots=1), tmp_path / "split.json", tree)
    with pytest.raises(error, match=match):
        load_split(_corrupt(path, mutate), tree)


def test_load_split_missing_file_and_bad_json(tree: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_split(tmp_path / "nope.json", tree)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(tmp_path / "bad.json", tree)


def test_unreadable_images(tree: Path, caplog, processor):
    broken = tree / "alpha" / "TV" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    tasks = scan_image_folder(tree, tasks=["alpha"])
    samples = [Sample(p, label) for label, images in enumerate(tasks["alpha"].images) for p in images]
    bad = find_unreadable_images(s.path for s in samples)
    assert [p for p, _ in bad] == [broken] and bad[0][1]
    with pytest.raises(ValueError, match=r"broken.png.*skip_unreadable=True"):
        filter_readable(samples)
    with pytest.raises(ValueError, match=r"broken.png.*skip_unreadable=True"):
        ImageClassificationDataset(samples, processor)
    with caplog.at_level(logging.WARNING, logger="peft_mmap.data"):
        dataset = ImageClassificationDataset(samples, processor, skip_unreadable=True)
    assert len(dataset) == len(samples) - 1
    assert [p for p, _ in dataset.skipped] == [broken]
    assert "broken.png" in caplog.text
    kept, skipped = filter_readable(samples[:3])
    assert kept == samples[:3] and skipped == []


def test_truncated_image_reported_by_name(tmp_path: Path, processor):
    path = tmp_path / "trunc.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"trunc\.jpg"):
        load_rgb(path)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_load_rgb_converts_modes(tmp_path: Path, mode):
    path = _png(tmp_path / f"img_{mode}.png", 1, mode)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize("cache", [False, True])
def test_dataset_outputs(tree: Path, processor, cache):
    _png(tree / "alpha" / "bike" / "gray.png", 7, "L")
    _png(tree / "alpha" / "bike" / "alpha.png", 8, "RGBA")
    splits = few_shot_split(scan_image_folder(tree, tasks=["alpha"]), shots=2)
    dataset = ImageClassificationDataset(splits["alpha"].test, processor, cache=cache)
    assert len(dataset) == len(splits["alpha"].test)
    for i in range(len(dataset)):
        pixel_values, label = dataset[i]
        assert pixel_values.shape == (3, 32, 32) and pixel_values.dtype == torch.float32
        assert isinstance(label, int) and label == splits["alpha"].test[i].label
    expected = processor(images=load_rgb(dataset.samples[0].path), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(dataset[0][0], expected)
    batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_validation_split_holds_out_shots_per_class_from_the_training_images(tree: Path):
    splits = few_shot_split(scan_image_folder(tree), shots=3, seed=0)
    held = validation_split(splits, shots=1, seed=5)
    for name, split in splits.items():
        part = held[name]
        assert part.classnames == split.classnames
        labels = [s.label for s in part.test]
        assert sorted(labels) == list(range(len(split.classnames)))  # one per class
        assert sorted(part.train + part.test, key=lambda s: s.path) == sorted(
            split.train, key=lambda s: s.path
        )
    assert validation_split(splits, shots=1, seed=5) == held  # deterministic
    assert validation_split(splits, shots=1, seed=6) != held
    with pytest.raises(ValueError, match=r"3 training image\(s\), cannot hold out 3 for validation"):
        validation_split(splits, shots=3)
    with pytest.raises(ValueError, match="validation shots must be a positive integer, got 0"):
        validation_split(splits, shots=0)
