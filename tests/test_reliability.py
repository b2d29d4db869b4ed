"""Reliability and security: bad inputs get clear errors, saves survive ``kill -9``, only safe formats load.

``BAD_MANIFESTS``, ``BAD_INFERENCE`` and the other case tables double as the documentation of what each
bad input produces (exception type and message).
"""

from __future__ import annotations

import copy
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_train import assert_identical, make_datasets, make_model, trainable

import peft_mmap
from peft_mmap import MmAPConfig, MmAPLayer
from peft_mmap.baselines import load_trainable, save_trainable
from peft_mmap.checkpoint import find_checkpoint
from peft_mmap.classifier import TaskSpec
from peft_mmap.files import check_safe_name
from peft_mmap.grouping import group_tasks
from peft_mmap.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, read_manifest
from peft_mmap.multitask import MultiTaskMmAP
from peft_mmap.train import TrainConfig, train

PACKAGE = Path(peft_mmap.__file__).resolve().parent
TASKS = [
    TaskSpec("art", ["cat", "dog", "bird"]),
    TaskSpec("clipart", ["cat", "dog"], template="a clipart of a {}."),
    TaskSpec("product", ["cup", "key"]),
]
GROUPS = [["art", "clipart"], ["product"]]
CONFIG = MmAPConfig(prompt_length=2, source_shape=(1, 8))
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def build(tokenizer, clip=None) -> MultiTaskMmAP:
    return MultiTaskMmAP(clip or make_clip(), tokenizer, TASKS, GROUPS, CONFIG).eval()


def adapter_params(model: MultiTaskMmAP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mmap_" in n}


def fill(model: MultiTaskMmAP, value: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mmap_" in name:
                p.fill_(value)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> Path:
    """A folder saved by `MultiTaskMmAP.save_pretrained` (copy it before damaging it)."""
    model = build(tokenizer)
    fill(model, 0.5)
    return model.save_pretrained(tmp_path_factory.mktemp("saved") / "adapters")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "adapters"))


def edit_manifest(folder: Path, mutate: Callable[[dict], object]) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    result = mutate(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest if result is None else result))


# ---- 1. manifests ---------------------------------------------------------------------------------------
def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


def _task(index: int, key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m["tasks"][index].__setitem__(key, value)


BAD_MANIFESTS = {
    "not an object": (lambda m: [m], "expected a JSON object, got list"),
    "wrong format": (_set("format", "peft"), "format is 'peft'"),
    "version as string": (_set("version", "1"), "version is '1', expected 1"),
    "version true": (_set("version", True), "version is True"),
    "base_model a number": (_set("base_model", 3), "'base_model' must be a string or null"),
    "no tasks": (_set("tasks", []), "'tasks' must be a non-empty list"),
    "task missing template": (
        lambda m: m["tasks"][0].__delitem__("template"),
        "exactly 'name', 'classnames'",
    ),
    "classnames a string": (_task(0, "classnames", "cat"), "'classnames' must be a list, got 'cat'"),
    "no classnames": (_task(0, "classnames", []), "has no classes"),
    "empty class name": (_task(0, "classnames", ["cat", " "]), "non-empty strings"),
    "class name a number": (_task(0, "classnames", ["cat", 7]), r"non-empty strings, got \[7\]"),
    "duplicate class names": (_task(0, "classnames", ["cat", "cat"]), r"duplicate class names \['cat'\]"),
    "template without {}": (_task(0, "template", "a photo"), "exactly one '{}'"),
    "task name '..'": (_task(0, "name", ".."), "Invalid task name '..'"),
    "task name 'a/b'": (_task(0, "name", "a/b"), "Invalid task name 'a/b'"),
    "task name ''": (_task(0, "name", ""), "Invalid task name ''"),
    "task name absolute": (_task(0, "name", "/etc"), "Invalid task name '/etc'"),
    "duplicate task names": (_task(1, "name", "art"), "task names must be unique"),
    "groups not lists": (_set("groups", "art"), "'groups' must be a list of lists"),
    "groups miss a task": (_set("groups", [["art"], ["product"]]), "exactly once"),
    "group names unknown task": (
        _set("groups", [["art", "clipart", "product", "x"]]),
        r"unknown tasks \['x'\]",
    ),
    "empty group": (_set("groups", [["art", "clipart", "product"], []]), "must not be empty"),
    "task_adapters a string": (_set("task_adapters", "yes"), "'task_adapters' must be true or false"),
    "mmap_config unknown field": (
        lambda m: m["mmap_config"].__setitem__("r", 8),
        "'mmap_config' must be an object with fields among",
    ),
    "mmap_config bad value": (
        lambda m: m["mmap_config"].__setitem__("prompt_length", 0),
        "not a valid MmAPConfig: MmAPConfig.prompt_length",
    ),
    "adapters list with '../evil'": (
        lambda m: m["adapters"].append("../evil"),
        r"imply \['group0', 'group1', 'art', 'clipart', 'product'\]",
    ),
    "adapters list missing one": (
        lambda m: m["adapters"].remove("product"),
        "tasks, groups and task_adapters imply",
    ),
    "no adapters at all": (
        lambda m: m.update(groups=[], task_adapters=False, adapters=[]),
        "no groups and 'task_adapters' is false",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifests_are_refused_with_the_field_named(folder, case):
    mutate, match = BAD_MANIFESTS[case]
    edit_manifest(folder, mutate)
    with pytest.raises(ValueError, match=match) as info:
        read_manifest(folder)
    assert str(folder / MANIFEST_NAME) in str(info.value)


def test_manifest_file_problems(folder, tokenizer):
    shutil.rmtree(folder / "product")
    with pytest.raises(
        ValueError, match=r"adapter 'product' is named but adapter_config.json, adapter_model"
    ):
        MultiTaskMmAP.from_pretrained(make_clip(), folder, tokenizer=tokenizer)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_manifest(folder)
    (folder / MANIFEST_NAME).write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ValueError, match=f"is {MAX_MANIFEST_BYTES + 1} bytes, more than the"):
        read_manifest(folder)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {MANIFEST_NAME} .*: not a MultiTaskMmAP folder"):
        MultiTaskMmAP.from_pretrained(make_clip(), folder, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        MultiTaskMmAP.from_pretrained(
            make_clip(), folder / "art" / "adapter_config.json", tokenizer=tokenizer
        )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MANIFEST_PATHS = [(), ("tasks",), ("tasks", 0), ("tasks", 0, "classnames"), ("groups",), ("mmap_config",)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["replace", "delete", "add", "whole"]),
    where=st.sampled_from(MANIFEST_PATHS),
    key=st.sampled_from(["format", "version", "tasks", "groups", "task_adapters", "adapters", "mmap_config",
                         "name", "classnames", "template", "prompt_length", "source_shape", "depth", 0, 1]),
    value=JSON,
)  # fmt: skip
def test_fuzzed_manifests_load_or_raise_value_error(folder, mode, where, key, value):
    original = json.loads((folder / MANIFEST_NAME).read_text())
    manifest = copy.deepcopy(original)
    node = manifest
    for step in where:
        node = node[step]
    if mode == "whole":
        manifest = value
    elif isinstance(node, dict) and not isinstance(key, int):
        node.pop(key, None) if mode == "delete" else node.__setitem__(key, value)
    elif isinstance(node, list) and isinstance(key, int) and key < len(node):
        node.pop(key) if mode == "delete" else node.__setitem__(key, value)
    elif isinstance(node, list) and mode == "add":
        node.append(value)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        assert read_manifest(folder) == manifest
    except (ValueError, FileNotFoundError):
        pass
    finally:
        (folder / MANIFEST_NAME).write_text(json.dumps(original))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzzed_manifest_bytes_raise_value_error(folder, raw):
    (folder / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(ValueError):
        read_manifest(folder)


# ---- 2. adapters --------------------------------------------------------------------------------------------
OTHER_BASES = {
    "wider text tower": (
        {"text": {"hidden_size": 64}},
        "text hidden 64 / vision hidden 48 / 3 layers",
        r"has shape \(2, 4\), but this base model expects \(2, 8\)",
    ),
    "fewer layers": (
        {"text": {"num_hidden_layers": 2}, "vision": {"num_hidden_layers": 2}},
        "text hidden 32 / vision hidden 48 / 2 layers",
        r"mmap_source' has shape \(3, 1, 8\), but this base model expects \(2, 1, 8\)",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_adapters_onto_another_base_are_refused_naming_the_sizes(saved, tokenizer, case):
    overrides, sizes, _ = OTHER_BASES[case]
    clip = make_clip(**overrides)
    message = "'group0' was saved for a model with text hidden 32 / vision hidden 48 / 3 layers; this model has "
    with pytest.raises(ValueError, match=re.escape(message + sizes)):
        MultiTaskMmAP.from_pretrained(clip, saved, tokenizer=tokenizer)
    assert not hasattr(clip, "peft_config")  # refused before the CLIP model was wrapped
    assert not any(isinstance(m, MmAPLayer) for m in clip.modules())


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_adapters_saved_without_tower_sizes_are_refused_naming_the_shapes(folder, tokenizer, case):
    overrides, _, shapes = OTHER_BASES[case]
    for config_file in folder.glob("*/adapter_config.json"):
        config = json.loads(config_file.read_text())
        del config["tower_sizes"]
        config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=shapes):
        MultiTaskMmAP.from_pretrained(make_clip(**overrides), folder, tokenizer=tokenizer)


def test_a_base_model_that_is_not_clip_is_refused(saved, tokenizer):
    with pytest.raises(
        TypeError, match=r"expected a CLIPModel or another dual encoder .*got CLIPVisionModel"
    ):
        MultiTaskMmAP.from_pretrained(make_clip().vision_model, saved, tokenizer=tokenizer)


def test_a_bad_last_adapter_leaves_every_weight_unchanged(folder, tokenizer):
    path = folder / "product" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    save_file({**tensors, key: torch.zeros(3, 3)}, path)
    model = build(tokenizer)
    before = adapter_params(model)
    with pytest.raises(ValueError, match=rf"Adapter 'product' weight '{re.escape(key)}' has shape \(3, 3\)"):
        model.load_adapter_weights(folder)
    assert_identical(before, adapter_params(model))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            ValueError,
            "truncated, corrupted",
        ),
        (lambda p: p.write_bytes(b"\x80\x04not safetensors"), ValueError, "truncated, corrupted"),
        (
            lambda p: save_file({k: v * float("nan") for k, v in load_file(p).items()}, p),
            ValueError,
            "Adapter 'clipart' holds NaN or inf",
        ),
    ],
    ids=["truncated", "pickle bytes", "nan weights"],
)
def test_damaged_adapter_files(folder, tokenizer, damage, error, match):
    damage(folder / "clipart" / "adapter_model.safetensors")
    model = build(tokenizer)
    before = adapter_params(model)
    with pytest.raises(error, match=match):
        model.load_adapter_weights(folder)
    assert_identical(before, adapter_params(model))


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "pickle bytes": lambda p: p.write_bytes(b"\x80\x04not safetensors"),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_plain_peft_loading_of_damaged_files_names_the_file(tmp_path, damage):
    """``PeftModel.from_pretrained``/``load_adapter`` reach `MmAPConfig.from_pretrained` before PEFT reads the
    weights, which turns safetensors' bare header error into one naming the file; nothing is changed."""
    get_peft_model(make_clip(), CONFIG, adapter_name="task").save_pretrained(tmp_path)
    weights = tmp_path / "task" / "adapter_model.safetensors"
    DAMAGES[damage](weights)
    message = rf"MmAP adapter weights file {re.escape(str(weights))} is truncated, corrupted"
    base = make_clip()
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, str(tmp_path / "task"))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, str(tmp_path), subfolder="task")
    assert not hasattr(base, "peft_config")
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    model = get_peft_model(make_clip(), CONFIG, adapter_name="kept")
    with pytest.raises(ValueError, match=message):
        model.load_adapter(str(tmp_path / "task"), adapter_name="task")
    assert list(model.peft_config) == ["kept"] and list(model.base_model.mmap_source) == ["kept"]


def test_plain_peft_loading_without_a_config_fails_loudly(tmp_path):
    get_peft_model(make_clip(), CONFIG).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        PeftModel.from_pretrained(make_clip(), str(tmp_path))


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "/abs", "../x", ".hidden", "a b", None, 3])
def test_unsafe_names_are_refused_before_anything_is_written(name, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Invalid task name"):
        MultiTaskMmAP(make_clip(), tokenizer, [TaskSpec("art", ["cat"]), TaskSpec(name, ["dog"])], None)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        check_safe_name(name, "adapter name")
    assert list(tmp_path.iterdir()) == []


def test_save_trainable_is_atomic_and_load_trainable_reports_bad_files(tokenizer, tmp_path, monkeypatch):
    model = build(tokenizer)
    path = save_trainable(model, tmp_path / "weights.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peft_mmap.baselines.persistence.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_trainable(model, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
    with pytest.raises(FileNotFoundError, match="trainable-parameter file not found"):
        load_trainable(model, tmp_path / "missing.safetensors")
    path.write_bytes(before[:50])
    with pytest.raises(ValueError, match=r"trainable-parameter file .* is truncated, corrupted"):
        load_trainable(model, path)


# ---- 3. inference ---------------------------------------------------------------------------------------
BAD_INFERENCE = {
    "unknown task": ((torch.zeros(1, 3, 16, 16), "sketch"), KeyError, r"known tasks: \['art', 'clipart'"),
    "unknown task in a list": ((torch.zeros(1, 3, 16, 16), ["sketch"]), KeyError, "Unknown task 'sketch'"),
    "task not a string": ((torch.zeros(1, 3, 16, 16), [3]), KeyError, "Unknown task 3"),
    "one channel": ((torch.zeros(2, 1, 16, 16), "art"), ValueError, r"\(B, 3, H, W\), got shape \(2, 1, 16"),
    "no batch dim": ((torch.zeros(3, 16, 16), "art"), ValueError, r"got shape \(3, 16, 16\)"),
    "wrong size": ((torch.zeros(2, 3, 32, 32), "art"), ValueError, "must be 16x16 images .* got 32x32"),
    "non-square": ((torch.zeros(2, 3, 16, 8), "art"), ValueError, "got 16x8"),
    "tasks vs batch": ((torch.zeros(2, 3, 16, 16), ["art"]), ValueError, "1 task names for a batch of 2"),
}


@pytest.mark.parametrize("case", list(BAD_INFERENCE))
def test_bad_inference_inputs(tokenizer, case):
    args, error, match = BAD_INFERENCE[case]
    with pytest.raises(error, match=match):
        build(tokenizer)(*args)


def test_empty_batches(tokenizer):
    model = build(tokenizer)
    assert model(torch.zeros(0, 3, 16, 16), "product").shape == (0, 2)
    assert model(torch.zeros(0, 3, 16, 16), []).shape == (0, 0)
    mixed = model(torch.zeros(2, 3, 16, 16), ["product", "art"])
    assert mixed.shape == (2, 3) and torch.isinf(mixed[0, 2])


# ---- 4. saves and checkpoints survive kill -9 ------------------------------------------------------------
def _slow_down_renames() -> None:
    """Sleep a little before every rename in this (child) process, so kills land mid-save."""
    rename = os.replace
    os.replace = lambda src, dst: (time.sleep(random.uniform(0, 0.01)), rename(src, dst))[1]


def _die_at_rename(count: int) -> None:
    """SIGKILL this (child) process just before its ``count``-th rename: a crash at a point chosen without
    depending on timing (every rename of a save happens while its staging folder exists)."""
    renames, rename = itertools.count(1), os.replace

    def replace(src, dst):
        if next(renames) == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst)

    os.replace = replace


def _save_versions_forever(
    model: MultiTaskMmAP, folder: Path, version: int, die_at_rename: int | None
) -> None:
    if die_at_rename is None:
        _slow_down_renames()
    else:
        _die_at_rename(die_at_rename)
    torch.set_num_threads(1)
    while True:
        fill(model, float(version))
        model.save_pretrained(folder)
        version += 1


@pytest.mark.skipif(FORK is None, reason="needs the fork start method")
def test_save_pretrained_killed_at_random_points_keeps_one_consistent_version(tokenizer, tmp_path):
    model = build(tokenizer)
    fill(model, 0.0)
    target = model.save_pretrained(tmp_path / "adapters")
    seen = 0.0
    rng = random.Random(0)
    for round_ in range(1, 9):  # round r saves versions 1000 r, 1000 r + 1, ...
        # Odd rounds: killed from outside at a random time. Even rounds: dies at a random rename, so that
        # some kills surely land mid-save whatever the machine's speed.
        die_at_rename = rng.randint(1, 40) if round_ % 2 == 0 else None
        args = (model, target, 1000 * round_, die_at_rename)
        child = FORK.Process(target=_save_versions_forever, args=args, daemon=True)
        child.start()
        if die_at_rename is None:
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        if die_at_rename is not None:
            assert child.exitcode == -signal.SIGKILL
            assert any(p.name.startswith(".") for p in target.iterdir()), "the kill did not land mid-save"
        loaded = MultiTaskMmAP.from_pretrained(make_clip(), target, tokenizer=tokenizer)
        values = torch.cat([p.flatten() for p in adapter_params(loaded).values()]).unique()
        assert len(values) == 1, f"a mix of versions loaded: {values.tolist()}"
        assert values.item() >= seen  # never goes back to an older version
        seen = values.item()
    model.save_pretrained(target)  # a later save cleans up after the crashes
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


KILL_CONFIG = TrainConfig(epochs=12, batch_size=8, lr=0.05, seed=3)


def _train_until_killed(tokenizer, out: Path, num_threads: int) -> None:
    _slow_down_renames()
    # The thread count of the runs it is compared with: CPU kernels split sums by thread count, so another
    # count changes the last bits of every step (the trainer warns when a resume changes it).
    torch.set_num_threads(num_threads)
    train(make_model(tokenizer), make_datasets(), KILL_CONFIG, out, resume=True, progress=False)


@pytest.mark.skipif(FORK is None, reason="needs the fork start method")
def test_training_killed_at_random_points_resumes_to_the_uninterrupted_result(tokenizer, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1)
    for _ in range(4):
        child = FORK.Process(
            target=_train_until_killed, args=(tokenizer, out, torch.get_num_threads()), daemon=True
        )
        child.start()
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        checkpoint = find_checkpoint(out)
        if checkpoint is not None:  # whatever survived is a complete checkpoint
            assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] >= 1
            assert load_file(checkpoint / "trainable.safetensors")
    resumed = make_model(tokenizer)
    train(resumed, make_datasets(), KILL_CONFIG, out, resume=True, progress=False)
    straight = make_model(tokenizer)
    train(straight, make_datasets(), KILL_CONFIG, progress=False)
    assert_identical(trainable(straight), trainable(resumed))


# ---- 5. safe loading -------------------------------------------------------------------------------------
UNSAFE = re.compile(r"torch\.load\(|\bimport pickle\b|\bpickle\.|\bdill\b|trust_remote_code\s*=\s*True")


def test_the_package_never_unpickles_or_runs_remote_code():
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if UNSAFE.search(line)
    ]
    assert offenders == []


def test_hub_downloads_fetch_only_json_safetensors_and_markdown(saved, tokenizer, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(saved)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = MultiTaskMmAP.from_pretrained(make_clip(), "user/mmap-adapters", tokenizer=tokenizer)
    assert calls == [("user/mmap-adapters", ["*.json", "*.safetensors", "*.md"])]
    assert set(model.tasks) == {"art", "clipart", "product"}


# ---- 6. grouping and training-config fuzzing ------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda n: st.lists(
            st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n, max_size=n),
            min_size=n,
            max_size=n,
        )
    )
)
def test_fuzzed_similarity_matrices_group_or_raise_value_error(matrix):
    names = [f"t{i}" for i in range(len(matrix))]
    try:
        groups = group_tasks(matrix, names)
    except ValueError as err:
        assert re.search(r"finite|symmetric", str(err))
    else:
        assert sorted(t for g in groups for t in g) == names


ANY = (
    st.none() | st.booleans() | st.integers(-3, 100) | st.floats() | st.text(max_size=5) | st.lists(st.none())
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(TrainConfig.__dataclass_fields__)), ANY, max_size=4))
def test_fuzzed_train_configs_validate_or_raise_value_error(fields):
    try:
        TrainConfig(**fields)
    except ValueError as err:
        assert str(err).startswith("TrainConfig.")


def test_task_adapters_only_round_trip(tokenizer, tmp_path):
    model = MultiTaskMmAP(make_clip(), tokenizer, TASKS, None, CONFIG)
    fill(model, 0.25)
    loaded = MultiTaskMmAP.from_pretrained(make_clip(), model.save_pretrained(tmp_path), tokenizer=tokenizer)
    assert loaded.groups == [] and loaded.adapter_names == ["art", "clipart", "product"]
    assert_identical(adapter_params(model), adapter_params(loaded))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--momentum", "nan"], "argument --momentum: expected a non-negative finite number, got 'nan'"),
        (
            ["--weight-decay", "-1"],
            "argument --weight-decay: expected a non-negative finite number, got '-1'",
        ),
        (["--lr", "inf"], "argument --lr: expected a positive finite number, got 'inf'"),
        (["--tasks", "../x"], "Invalid task name '../x'"),
    ],
)
def test_cli_rejects_bad_values_with_exit_code_2(workspace, tmp_path, capsys, option, message):
    from peft_mmap.apps.cli import main

    argv = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2",
            "--output", str(tmp_path / "run"), *option]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
