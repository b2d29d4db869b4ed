"""MmAPConfig validation, against its own fields and against the model's sizes."""

from __future__ import annotations

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
        ({"prompt_length": 4.0}, "prompt_length must be a positive int, got 4.0"),
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


def test_json_round_trip_keeps_tuple_shape(tmp_path):
    config = MmAPConfig(prompt_length=6, source_shape=(3, 4), depth=2, scale_init="normal")
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MmAPConfig)
    assert loaded.source_shape == (3, 4) and loaded.depth == 2 and loaded.scale_init == "normal"
    assert loaded.peft_type == "MMAP"


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
