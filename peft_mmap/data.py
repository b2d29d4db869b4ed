"""Multi-domain image-folder tasks, reproducible k-shot splits and CLIP preprocessing.

Layouts:

* generic: ``<root>/<task>/<class>/<image>`` (:func:`scan_image_folder`);
* Office-Home: ``<root>/{Art,Clipart,Product,Real World}/<class>/*.jpg`` (:func:`office_home`);
* DomainNet / MiniDomainNet: ``<root>/<domain>/<class>/*.jpg``, optionally restricted by split files
  ``<domain>_train.txt`` / ``<domain>_test.txt`` listing ``relative/path.jpg label`` (:func:`domainnet`).

Task names are folder names lower-cased with spaces turned into ``_`` (``"Real World"`` -> ``real_world``)
and must pass :func:`peft_mmap.files.check_safe_name`. :func:`few_shot_split` draws the training images,
:func:`save_split` / :func:`load_split` store a split so a run can be repeated exactly, and
:class:`ImageClassificationDataset` turns samples into CLIP pixel values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from peft_mmap.checks import is_positive_int
from peft_mmap.files import atomic_write_json, check_safe_name, read_json
from peft_mmap.options import LAYOUTS

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
"""File extensions (compared case-insensitively) recognised as images."""

OFFICE_HOME_DOMAINS = ("art", "clipart", "product", "real_world")
#: The 65 Office-Home classes (folder names, lower case, underscores as spaces).
OFFICE_HOME_CLASSES: tuple[str, ...] = (
    "alarm clock", "backpack", "batteries", "bed", "bike", "bottle", "bucket", "calculator", "calendar",
    "candles", "chair", "clipboards", "computer", "couch", "curtains", "desk lamp", "drill", "eraser",
    "exit sign", "fan", "file cabinet", "flipflops", "flowers", "folder", "fork", "glasses", "hammer",
    "helmet", "kettle", "keyboard", "knives", "lamp shade", "laptop", "marker", "monitor", "mop", "mouse",
    "mug", "notebook", "oven", "pan", "paper clip", "pen", "pencil", "postit notes", "printer", "push pin",
    "radio", "refrigerator", "ruler", "scissors", "screwdriver", "shelf", "sink", "sneakers", "soda",
    "speaker", "spoon", "table", "telephone", "toothbrush", "toys", "trash can", "tv", "webcam",
)  # fmt: skip
DOMAINNET_DOMAINS = ("clipart", "painting", "real", "sketch")
"""The four domains of MiniDomainNet (the default tasks of the ``domainnet`` layout)."""
DOMAINNET_ALL_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

SPLIT_FORMAT = "peft_mmap.split"
SPLIT_VERSION = 1

StrPath = str | os.PathLike


def class_display_name(folder: str) -> str:
    """Human-readable class name for prompts: ``"Alarm_Clock"`` -> ``"alarm clock"``, ``"TV"`` -> ``"tv"``."""
    return " ".join(re.sub(r"[_\-]", " ", folder).lower().split())


def task_name(folder: str) -> str:
    """Task name for a folder: lower-cased, whitespace runs to ``_`` (``"Real World"`` -> ``real_world``).

    Raises:
        ValueError: if the result is not a safe name (see :func:`peft_mmap.files.check_safe_name`).
    """
    return check_safe_name("_".join(folder.lower().split()), "task name")


@dataclass
class TaskFolder:
    """One task (domain): its classes and the images of each class."""

    name: str
    root: Path
    class_dirs: list[str]
    """Class folder names, sorted."""
    classnames: list[str]
    """Display names (:func:`class_display_name`), aligned with ``class_dirs``."""
    images: list[list[Path]] = field(repr=False)
    """Per class (aligned with ``class_dirs``), the sorted image paths."""

    def __post_init__(self) -> None:
        if not len(self.class_dirs) == len(self.classnames) == len(self.images):
            raise ValueError(f"task {self.name!r}: class_dirs, classnames and images must align")
        seen: dict[str, str] = {}
        for class_dir, display in zip(self.class_dirs, self.classnames, strict=True):
            if display in seen:
                raise ValueError(
                    f"task {self.name!r}: class folders {seen[display]!r} and {class_dir!r} have the same "
                    f"display name {display!r}"
                )
            seen[display] = class_dir


@dataclass
class Sample:
    """One labelled image; ``label`` indexes the task's ``classnames``."""

    path: Path
    label: int


@dataclass
class TaskSplit:
    """Train/test samples of one task."""

    name: str
    classnames: list[str]
    train: list[Sample] = field(repr=False)
    test: list[Sample] = field(repr=False)


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str)


def _check_root(root: StrPath, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found (expected a directory): {path}")
    return path


def _build_task(name: str, class_images: dict[str, list[Path]], root: Path) -> TaskFolder:
    """Make a :class:`TaskFolder` from ``{class folder: images}`` (sorted here)."""
    class_dirs = sorted(class_images)
    return TaskFolder(
        name=name,
        root=root,
        class_dirs=class_dirs,
        classnames=[class_display_name(c) for c in class_dirs],
        images=[sorted(class_images[c]) for c in class_dirs],
    )


def _scan_task(name: str, folder: Path) -> TaskFolder:
    """Scan ``<folder>/<class>/<image>``."""
    class_images: dict[str, list[Path]] = {}
    for class_dir in _subdirs(folder):
        images = [p for p in class_dir.iterdir() if _is_image(p)]
        if not images:
            raise ValueError(
                f"class folder {class_dir} has no images (expected files ending in "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        class_images[class_dir.name] = images
    if not class_images:
        raise ValueError(f"task folder {folder} has no class folders (expected <task>/<class>/<image>)")
    return _build_task(name, class_images, folder)


def _task_folders(root: Path) -> dict[str, Path]:
    """Map task names to the task folders directly under ``root``."""
    found: dict[str, Path] = {}
    for folder in _subdirs(root):
        name = task_name(folder.name)
        if name in found:
            raise ValueError(f"folders {found[name]} and {folder} both map to task name {name!r}")
        found[name] = folder
    return found


def _select(found: dict[str, Path], tasks: Iterable[str] | None, root: Path) -> list[str]:
    """Task names to load: the requested ones (normalised, in the given order) or all, sorted."""
    if tasks is None:
        if not found:
            raise ValueError(f"no task folders found under {root} (expected <root>/<task>/<class>/<image>)")
        return sorted(found)
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of task names, not the string {tasks!r}")
    selected = []
    for requested in tasks:
        name = task_name(requested)
        if name not in found:
            raise ValueError(f"task {requested!r} not found under {root}; found: {sorted(found)}")
        if name in selected:
            raise ValueError(f"task {requested!r} requested twice")
        selected.append(name)
    if not selected:
        raise ValueError("tasks must name at least one task")
    return selected


def scan_image_folder(root: StrPath, tasks: Iterable[str] | None = None) -> dict[str, TaskFolder]:
    """Scan ``<root>/<task>/<class>/<image>`` folders.

    Args:
        root: data root.
        tasks: task names (or folder names, normalised with :func:`task_name`) to load, in this order;
            ``None`` loads every task folder, sorted by task name.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: a task folder without class folders, a class folder without images, an unknown
            requested task, or two folders mapping to the same task name.
    """
    root_path = _check_root(root, "data root")
    found = _task_folders(root_path)
    return {name: _scan_task(name, found[name]) for name in _select(found, tasks, root_path)}


def office_home(root: StrPath, domains: Sequence[str] = OFFICE_HOME_DOMAINS) -> dict[str, TaskFolder]:
    """Load Office-Home (``<root>/{Art,Clipart,Product,Real World}/<class>/*.jpg``).

    Task names are ``art``, ``clipart``, ``product`` and ``real_world`` (folder ``Real World`` or
    ``Real_World``); ``domains`` selects a subset, in the given order.
    """
    return scan_image_folder(root, domains)


def _parse_split_file(split_file: Path, root: Path) -> list[tuple[Path, str, int]]:
    """Read ``relative/path.jpg label`` lines; returns ``(image path, class folder, label)``."""
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    entries = []
    for number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{split_file}:{number}"
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            raise ValueError(f"{where}: expected 'relative/path.jpg label', got {line.strip()!r}")
        rel = PurePosixPath(parts[0].replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) < 2:
            raise ValueError(f"{where}: expected a relative path <domain>/<class>/<image>, got {parts[0]!r}")
        path = root.joinpath(*rel.parts)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {path} does not exist")
        entries.append((path, rel.parts[-2], int(parts[1])))
    return entries


def _domain_from_split_files(domain: str, root: Path, split_dir: Path) -> TaskFolder:
    """Collect a domain's images from ``<domain>_train.txt`` and ``<domain>_test.txt`` (deduplicated)."""
    class_images: dict[str, set[Path]] = {}
    label_of: dict[str, int] = {}
    folder_of: dict[int, str] = {}
    for split in ("train", "test"):
        split_file = split_dir / f"{domain}_{split}.txt"
        for path, class_dir, label in _parse_split_file(split_file, root):
            if label_of.setdefault(class_dir, label) != label:
                raise ValueError(
                    f"{split_file}: class folder {class_dir!r} has label {label} but label "
                    f"{label_of[class_dir]} elsewhere in the {domain!r} split files"
                )
            if folder_of.setdefault(label, class_dir) != class_dir:
                raise ValueError(
                    f"{split_file}: label {label} is used for class folders {folder_of[label]!r} "
                    f"and {class_dir!r}"
                )
            class_images.setdefault(class_dir, set()).add(path)
    if not class_images:
        raise ValueError(f"split files for domain {domain!r} in {split_dir} list no images")
    return _build_task(task_name(domain), {c: list(p) for c, p in class_images.items()}, root / domain)


def _restrict_classes(task: TaskFolder, classes: Sequence[str]) -> TaskFolder:
    """Keep only the class folders in ``classes``."""
    images = dict(zip(task.class_dirs, task.images, strict=True))
    missing = [c for c in classes if c not in images]
    if missing:
        raise ValueError(f"task {task.name!r} has no class folder(s) {missing}; found: {task.class_dirs}")
    return _build_task(task.name, {c: images[c] for c in classes}, task.root)


def domainnet(
    root: StrPath,
    split_dir: StrPath | None = None,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    classes: Sequence[str] | None = None,
) -> dict[str, TaskFolder]:
    """Load DomainNet or MiniDomainNet domains as tasks.

    Args:
        root: data root holding ``<domain>/<class>/<image>``.
        split_dir: folder with ``<domain>_train.txt`` and ``<domain>_test.txt`` whose lines are
            ``relative/path.jpg label`` (paths relative to ``root``, e.g. MiniDomainNet's 126-class
            ``splits_mini``). The union of both files (deduplicated) forms the task; the original
            train/test division is not kept (use :func:`few_shot_split`), the label column is only checked
            for consistency with the class folder. ``None`` scans the domain folders instead.
        domains: domain folder names, in the returned order.
        classes: optional class folder names to keep (e.g. a subset of the 345 classes).

    Raises:
        FileNotFoundError: missing root, split file or listed image.
        ValueError: an unparsable split line, inconsistent labels, unknown domain or class.
    """
    root_path = _check_root(root, "DomainNet root")
    if split_dir is None:
        tasks = scan_image_folder(root_path, domains)
    else:
        split_path = _check_root(split_dir, "split directory")
        tasks = {}
        for domain in domains:
            name = task_name(domain)
            if name in tasks:
                raise ValueError(f"domain {domain!r} requested twice")
            tasks[name] = _domain_from_split_files(domain, root_path, split_path)
    if classes is not None:
        tasks = {name: _restrict_classes(task, list(classes)) for name, task in tasks.items()}
    return tasks


def _class_rng(seed: int, task: str, class_dir: str) -> random.Random:
    """RNG seeded from ``(seed, task, class folder)`` by SHA-256 (independent of iteration order)."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{class_dir}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def validation_split(splits: Mapping[str, TaskSplit], shots: int, seed: int = 0) -> dict[str, TaskSplit]:
    """Hold out ``shots`` of each class's training images as a validation set (for choosing hyper-parameters).

    Returns, per task, a split whose ``train`` keeps the other training images and whose ``test`` is the
    held-out ones; the original test images are left out. Each class draws with its own RNG seeded from
    ``(seed, task, label)`` as in `few_shot_split`, so the same split and seed give the same held-out images.

    Raises:
        ValueError: ``shots`` not a positive int, or a class with fewer than ``shots + 1`` training images
            (one must stay for training).
    """
    if not is_positive_int(shots):
        raise ValueError(f"validation shots must be a positive integer, got {shots!r}")
    result = {}
    for name, split in splits.items():
        train: list[Sample] = []
        held: list[Sample] = []
        for label, classname in enumerate(split.classnames):
            samples = [s for s in split.train if s.label == label]
            if len(samples) <= shots:
                raise ValueError(
                    f"task {name!r}, class {classname!r}: {len(samples)} training image(s), cannot hold out "
                    f"{shots} for validation and keep one for training"
                )
            chosen = set(_class_rng(seed, name, f"validation\0{label}").sample(range(len(samples)), shots))
            for i, sample in enumerate(samples):
                (held if i in chosen else train).append(sample)
        result[name] = TaskSplit(name, list(split.classnames), train, held)
    return result


def load_task_folders(
    root: StrPath,
    layout: str = "generic",
    split_dir: StrPath | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, TaskFolder]:
    """The tasks of a dataset folder in one of `LAYOUTS` (see `scan_image_folder`, `office_home`, `domainnet`).

    Raises:
        ValueError: an unknown layout, or data that is not of the named layout (see `check_layout`).
    """
    if layout == "generic":
        return scan_image_folder(root, tasks)
    if layout == "officehome":
        folders = office_home(root, tasks or OFFICE_HOME_DOMAINS)
    elif layout == "domainnet":
        folders = domainnet(root, split_dir, tasks or DOMAINNET_DOMAINS)
    else:
        raise ValueError(f"Unknown dataset layout {layout!r}; expected one of {LAYOUTS}.")
    check_layout(layout, {name: task.classnames for name, task in folders.items()}, root)
    return folders


def check_layout(layout: str, tasks: dict[str, Sequence[str]], root: StrPath) -> None:
    """Refuse tasks (``{task: class display names}``) that are not of ``layout``.

    ``officehome``: tasks among `OFFICE_HOME_DOMAINS` whose classes are among `OFFICE_HOME_CLASSES` (a
    subset of the classes is fine); ``domainnet``: tasks among `DOMAINNET_ALL_DOMAINS`; ``generic``: any.

    Raises:
        ValueError: naming the first task or classes that do not fit, and the layout to use instead.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown dataset layout {layout!r}; expected one of {LAYOUTS}.")
    domains = {"officehome": OFFICE_HOME_DOMAINS, "domainnet": DOMAINNET_ALL_DOMAINS}.get(layout)
    if domains is None:
        return
    hint = "use --layout generic (<root>/<task>/<class>/<image>) for other data"
    for name, classnames in tasks.items():
        if name not in domains:
            raise ValueError(f"{root}: task {name!r} is not a {layout} domain {list(domains)}; {hint}.")
        foreign = [c for c in classnames if c not in OFFICE_HOME_CLASSES] if layout == "officehome" else []
        if foreign:
            raise ValueError(
                f"{root}: task {name!r} has classes that are not Office-Home classes, e.g. {foreign[:3]}; "
                f"{hint}."
            )


def few_shot_split(
    tasks: dict[str, TaskFolder],
    shots: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> dict[str, TaskSplit]:
    """Draw training images per class; every other image of the class is a test image.

    Exactly one of ``shots`` (``k`` images per class) or ``fraction`` (``max(1, round(fraction * n))``
    images of a class with ``n`` images; Python ``round``, halves to even) is given. Each class draws with
    its own RNG seeded by a SHA-256 of ``(seed, task name, class folder)``, so the split does not depend on
    dict order, on other tasks or classes, or on the platform. Samples are ordered by label, then path.

    Raises:
        ValueError: not exactly one of ``shots``/``fraction``; ``shots`` not a positive int; ``fraction``
            not in ``(0, 1)``; no tasks; a class with fewer than ``k + 1`` images (one must stay for test).
    """
    if (shots is None) == (fraction is None):
        raise ValueError(f"give exactly one of shots or fraction, got shots={shots!r}, fraction={fraction!r}")
    if shots is not None and not is_positive_int(shots):
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
    ):
        raise ValueError(f"fraction must be a number strictly between 0 and 1, got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not tasks:
        raise ValueError("tasks is empty: nothing to split")
    splits = {}
    for name, task in tasks.items():
        train: list[Sample] = []
        test: list[Sample] = []
        for label, (class_dir, images) in enumerate(zip(task.class_dirs, task.images, strict=True)):
            n = len(images)
            k = shots if shots is not None else max(1, round(fraction * n))
            if k > n - 1:
                asked = f"shots={shots}" if shots is not None else f"fraction={fraction}"
                raise ValueError(
                    f"task {name!r}, class {class_dir!r}: {k} training image(s) requested ({asked}) but only "
                    f"{n} available; at least one must remain for testing"
                )
            chosen = set(_class_rng(seed, name, class_dir).sample(range(n), k))
            for i, path in enumerate(images):
                (train if i in chosen else test).append(Sample(path, label))
        splits[name] = TaskSplit(name, list(task.classnames), train, test)
    return splits


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError as err:
        raise ValueError(f"image {path} is not inside the data root {root}") from err


def save_split(splits: dict[str, TaskSplit], path: StrPath, root: StrPath) -> Path:
    """Write ``splits`` as JSON (atomically) with image paths relative to ``root``.

    Tasks are sorted by name and samples by ``(label, path)``. Returns the written path.

    Raises:
        ValueError: an image outside ``root``.
    """
    root_path = Path(root).resolve()

    def encode(samples: list[Sample]) -> list[list[Any]]:
        rows = [[_relative(s.path, root_path), int(s.label)] for s in samples]
        return sorted(rows, key=lambda row: (row[1], row[0]))

    payload = {
        "format": SPLIT_FORMAT,
        "version": SPLIT_VERSION,
        "tasks": {
            name: {
                "classnames": list(split.classnames),
                "train": encode(split.train),
                "test": encode(split.test),
            }
            for name, split in sorted(splits.items())
        },
    }
    return atomic_write_json(path, payload)


def _decode_samples(rows: Any, where: str, num_classes: int, root: Path) -> list[Sample]:
    if not isinstance(rows, list):
        raise ValueError(f"{where} must be a list of [relative_path, label] pairs")
    samples = []
    for i, row in enumerate(rows):
        if not (
            isinstance(row, list)
            and len(row) == 2
            and isinstance(row[0], str)
            and isinstance(row[1], int)
            and not isinstance(row[1], bool)
        ):
            raise ValueError(f"{where}[{i}] must be [relative_path, label], got {row!r}")
        rel = PurePosixPath(row[0])
        if not row[0] or rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{where}[{i}]: path must be relative to the data root, got {row[0]!r}")
        if not 0 <= row[1] < num_classes:
            raise ValueError(f"{where}[{i}]: label {row[1]} out of range for {num_classes} classes")
        image = root.joinpath(*rel.parts)
        if not image.is_file():
            raise FileNotFoundError(f"{where}[{i}]: image {image} does not exist")
        samples.append(Sample(image, row[1]))
    return samples


def load_split(path: StrPath, root: StrPath) -> dict[str, TaskSplit]:
    """Read a split written by :func:`save_split`, resolving paths against ``root``.

    Raises:
        FileNotFoundError: missing split file, data root or image.
        ValueError: malformed JSON or content (types, labels, task names, train/test overlap).
    """
    root_path = _check_root(root, "data root")
    data = read_json(path, "split file")
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise ValueError(f"split file {path} is not a {SPLIT_FORMAT} file")
    if data.get("version") != SPLIT_VERSION:
        raise ValueError(f"split file {path} has version {data.get('version')!r}, expected {SPLIT_VERSION}")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"split file {path}: 'tasks' must be a non-empty object")
    splits = {}
    for name, entry in tasks.items():
        check_safe_name(name, f"task name in split file {path}")
        where = f"split file {path}, task {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with classnames, train and test")
        classnames = entry.get("classnames")
        if not (isinstance(classnames, list) and classnames and all(isinstance(c, str) for c in classnames)):
            raise ValueError(f"{where}: 'classnames' must be a non-empty list of strings")
        train = _decode_samples(entry.get("train"), f"{where}, train", len(classnames), root_path)
        test = _decode_samples(entry.get("test"), f"{where}, test", len(classnames), root_path)
        overlap = {s.path for s in train} & {s.path for s in test}
        if overlap:
            raise ValueError(f"{where}: image(s) in both train and test, e.g. {min(overlap)}")
        splits[name] = TaskSplit(name, classnames, train, test)
    return splits


def find_unreadable_images(paths: Iterable[StrPath]) -> list[tuple[Path, str]]:
    """Open and verify each image with PIL; returns ``(path, reason)`` for those that fail.

    ``verify`` checks headers and (for PNG) checksums without decoding every pixel, so a truncated JPEG
    may still pass; :class:`ImageClassificationDataset` reports such a file by name when it is decoded.
    """
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many exception types for broken files
            bad.append((Path(path), f"{type(err).__name__}: {err}"))
    return bad


def filter_readable(
    samples: Sequence[Sample], skip_unreadable: bool = False
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Drop unreadable images (see :func:`find_unreadable_images`); returns ``(kept, skipped)``.

    Raises:
        ValueError: an unreadable image while ``skip_unreadable`` is False (the message names the file).
    """
    bad = find_unreadable_images(dict.fromkeys(s.path for s in samples))
    if not bad:
        return list(samples), []
    if not skip_unreadable:
        listed = "; ".join(f"{p} ({reason})" for p, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"{len(bad)} unreadable image(s): {listed}{more}. Fix or remove them, or pass "
            "skip_unreadable=True to drop them."
        )
    dropped = {p for p, _ in bad}
    logger.warning("Skipping %d unreadable image(s): %s", len(bad), ", ".join(str(p) for p, _ in bad))
    return [s for s in samples if s.path not in dropped], bad


def load_rgb(path: StrPath) -> Image.Image:
    """Decode an image as RGB (grayscale, palette and RGBA images are converted).

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")
    except Exception as err:  # PIL raises many exception types for broken files
        raise ValueError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``(pixel_values, label)`` pairs preprocessed with a CLIP image processor.

    Args:
        samples: the images and labels.
        processor: the checkpoint's image processor (e.g. ``CLIPImageProcessor.from_pretrained(...)``), so
            preprocessing matches the checkpoint exactly.
        cache: preprocess every image once at construction and keep the tensors in memory.
        skip_unreadable: drop images PIL cannot open/verify (listed in :attr:`skipped` and logged) instead
            of raising ``ValueError``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: BaseImageProcessor,
        cache: bool = False,
        skip_unreadable: bool = False,
    ) -> None:
        self.samples, self.skipped = filter_readable(samples, skip_unreadable)
        self.processor = processor
        self._cache: list[torch.Tensor] | None = None
        if cache:
            self._cache = [self._preprocess(s.path) for s in self.samples]

    def _preprocess(self, path: Path) -> torch.Tensor:
        pixel_values = self.processor(images=load_rgb(path), return_tensors="pt")["pixel_values"]
        return pixel_values[0].float()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        pixel_values = self._cache[index] if self._cache is not None else self._preprocess(sample.path)
        return pixel_values, sample.label
