"""MmAPConfig validation, against its own fields and against the model's sizes."""

from __future__ import annotations

import json

import pytest
from conftest import make_clip
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftConfig, get_peft_model

from peft_mmap import MmAPConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_length": 0}, "prompt_length must be a positive int, got 0"),
        ({"prompt_length": 3}, r"prompt_length \(b=3\) must be divisible by source_shape\[0\] \(m=2\)"),
        ({"source_shape": (2,)}, "source_shape must be a pair"),
        ({"source_shape": (2, -8)}, r"source_shape\[1\] \(n\) must be a positive int, got -8"),
        ({"depth": 0}, "depth must be a positive int, got 0"),
        ({"init_std": -1.0}, "init_std must be a positive float, got -1.0"),
        ({"scale_init": "uniform"}, "scale_init must be one of"),
        (
            {"text_placement": "prepend"},
            r"text_placement must be one of \('insert', 'replace'\), got 'prepend'",
        ),
        ({"text_placement": None}, r"text_placement must be one of .*, got None"),
        ({"prompt_length": 4.0}, "prompt_length must be a positive int, got 4.0"),
        ({"tower_sizes": {}}, "tower_sizes must be None or a mapping"),
        ({"tower_sizes": {"audio": {"hidden_size": 8, "num_layers": 2}}}, "tower_sizes must be None"),
        ({"tower_sizes": {"text": {"hidden_size": 8}}}, "tower_sizes must be None"),
        ({"tower_sizes": {"text": {"hidden_size": 8, "num_layers": 0}}}, "tower_sizes must be None"),
        ({"tower_sizes": [["text", 8, 2]]}, "tower_sizes must be None"),
    ],
)
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MmAPConfig(**kwargs)


def test_sizes_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"n=7 must divide the text hidden size 32"):
        get_peft_model(make_clip(), MmAPConfig(prompt_length=4, source_shape=(2, 7)))
    with pytest.raises(ValueError, match=r"depth=4 exceeds the 3 layers the towers share"):
        get_peft_model(make_clip(), MmAPConfig(depth=4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt_length": 6, "source_shape": (3, 4), "depth": 2, "scale_init": "normal"},
        {
            "source_shape": [2, 8],
            "target_modules": ["vision_model.encoder.layers.1", "text_model.encoder.layers.0"],
        },
        {"tower_sizes": {"vision": {"hidden_size": 48, "num_layers": 3}}, "inference_mode": True},
        {"text_placement": "replace"},
    ],
    ids=["defaults", "tuple-shape", "module-list", "tower-sizes", "replace"],
)
def test_to_dict_equals_the_json_written_and_read_back(tmp_path, kwargs):
    """As PEFT's config tests: ``to_dict()`` is JSON-natural (lists, no tuples or sets) and survives a
    save/load round trip unchanged."""
    config = MmAPConfig(**kwargs)
    as_dict = config.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert isinstance(as_dict["source_shape"], list) and isinstance(config.source_shape, list)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == as_dict
    for loaded in (MmAPConfig.from_pretrained(tmp_path), PeftConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, MmAPConfig) and loaded.peft_type == "MMAP"
        assert loaded.to_dict() == as_dict


def test_the_config_peft_saves_for_a_model_reads_back_unchanged(tmp_path):
    model = get_peft_model(make_clip(), MmAPConfig(prompt_length=6, source_shape=(3, 8)), adapter_name="task")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    assert MmAPConfig.from_pretrained(tmp_path / "task").to_dict() == written
    assert written["source_shape"] == [3, 8]


def test_a_config_saved_before_text_placement_existed_loads_as_insert(tmp_path):
    assert MmAPConfig().text_placement == "insert"
    MmAPConfig(text_placement="replace").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["text_placement"] == "replace"
    del saved["text_placement"]
    path.write_text(json.dumps(saved))
    assert MmAPConfig.from_pretrained(tmp_path).text_placement == "insert"


@pytest.mark.parametrize("name", ["encoder", "0", "layers", "a.b", "a/b", "", "..", "/abs", "mmap_source"])
def test_adapter_names_that_break_key_filtering_are_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(make_clip(), MmAPConfig(), adapter_name=name)


def test_refused_add_adapter_leaves_the_model_unchanged():
    model = get_peft_model(make_clip(), MmAPConfig(), adapter_name="group0")
    before = set(model.state_dict())
    with pytest.raises(ValueError):
        model.add_adapter("encoder", MmAPConfig())
    with pytest.raises(ValueError):
        model.add_adapter("big", MmAPConfig(depth=9))
    assert set(model.state_dict()) == before and list(model.peft_config) == ["group0"]


@settings(max_examples=60, deadline=None)
@given(
    b=st.one_of(st.integers(-3, 12), st.floats(allow_nan=True), st.none(), st.text(max_size=2)),
    m=st.one_of(st.integers(-3, 6), st.floats(allow_nan=True), st.text(max_size=2)),
    n=st.one_of(st.integers(-3, 20), st.none()),
    depth=st.one_of(st.none(), st.integers(-2, 14), st.booleans()),
)
def test_fuzzed_configs_either_validate_or_raise_value_error(b, m, n, depth):
    """Any field combination gives a valid config or a ValueError naming the field, never anything else."""
    try:
        config = MmAPConfig(prompt_length=b, source_shape=(m, n), depth=depth)
    except ValueError as err:
        assert "MmAPConfig." in str(err)
        return
    assert config.prompt_length % config.source_shape[0] == 0
    assert config.prompt_length > 0 and config.source_shape[1] > 0
