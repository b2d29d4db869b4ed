"""MmAPModel through PEFT's verbs: adapters, activation, gradients, save/load, unload, merge, tower types."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import LAYERS, TEXT_HIDDEN, VISION_HIDDEN, make_clip, tiny_clip_config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from peft_mmap import MmAPConfig, MmAPLayer

CFG = MmAPConfig(prompt_length=4, source_shape=(2, 8))


def _two_adapters(clip):
    model = get_peft_model(clip, CFG, adapter_name="group0")
    model.add_adapter("art", CFG)
    model.base_model.set_adapter(["group0", "art"])
    return model


def _randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mmap_" in name:
                p.normal_()


def per_adapter_params(b, m, n, d_l, d_v, depth):
    return depth * (m * n + (b // m) * (d_l // n) + (b // m) * (d_v // n))


def test_parameter_count_matches_formula(clip):
    model = _two_adapters(clip)
    expected = per_adapter_params(4, 2, 8, TEXT_HIDDEN, VISION_HIDDEN, LAYERS)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * expected
    model.print_trainable_parameters()


def test_gradients_reach_active_adapters_only(clip, batch):
    model = get_peft_model(clip, CFG, adapter_name="group0")
    model.add_adapter("art", CFG)
    model.add_adapter("clipart", CFG)
    _randomise(model)  # zero-initialised scales would give the source prompts no gradient at step 0
    model.base_model.set_adapter(["group0", "art"])
    model(**batch).logits_per_image.sum().backward()
    for name, p in model.named_parameters():
        active = "mmap_" in name and name.split(".")[-1] in ("group0", "art")
        assert p.requires_grad == active, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == active, name


def test_inactive_adapters_are_untouched_by_training(clip, batch):
    model = get_peft_model(clip, CFG, adapter_name="group0")
    model.add_adapter("art", CFG)
    model.add_adapter("clipart", CFG)
    _randomise(model)
    model.base_model.set_adapter(["group0", "art"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).logits_per_image.sum().backward()
    opt.step()
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == ("mmap_" in key and key.split(".")[-1] in ("group0", "art")), key


def test_disable_adapter_gives_base_outputs_exactly(clip, batch):
    base = clip(**batch).logits_per_image.clone()
    model = _two_adapters(clip)
    _randomise(model)
    assert not torch.allclose(model(**batch).logits_per_image, base)
    with model.disable_adapter():
        assert torch.equal(model(**batch).logits_per_image, base)
    assert any(p.requires_grad for p in model.parameters())


def test_save_load_round_trip_with_several_adapters(clip, batch, tmp_path):
    model = _two_adapters(clip)
    _randomise(model)
    expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    for name in ("group0", "art"):
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "MMAP"
        keys = load_file(folder / "adapter_model.safetensors")
        assert sum("mmap_source" in k for k in keys) == 1
        assert sum("mmap_scale" in k for k in keys) == 2 * LAYERS
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    fresh = make_clip()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "group0", adapter_name="group0")
    loaded.load_adapter(tmp_path / "art", adapter_name="art")
    loaded.base_model.set_adapter(["group0", "art"], inference_mode=True)
    torch.testing.assert_close(loaded(**batch).logits_per_image, expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_loading_in_a_fresh_process_after_import(clip, tmp_path):
    model = _two_adapters(clip)
    model.save_pretrained(tmp_path)
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "import peft_mmap; from conftest import make_clip; from peft import PeftModel;"
        f"m = PeftModel.from_pretrained(make_clip(), r'{tmp_path / 'art'}', adapter_name='art');"
        "print(type(m.base_model).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "MmAPModel"


def test_delete_adapter(clip, batch):
    model = _two_adapters(clip)
    model.delete_adapter("art")
    assert "art" not in model.peft_config
    assert "art" not in model.base_model.mmap_source
    assert not any("art" in m.mmap_scale for m in model.modules() if isinstance(m, MmAPLayer))
    model(**batch)


def test_unload_returns_the_untouched_base_model(clip, batch):
    base_state = {k: v.clone() for k, v in clip.state_dict().items()}
    expected = clip(**batch).logits_per_image.clone()
    model = _two_adapters(clip)
    _randomise(model)
    base = model.unload()
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    assert base.state_dict().keys() == base_state.keys()
    assert torch.equal(base(**batch).logits_per_image, expected)


def test_merge_is_refused_with_a_clear_error(clip):
    model = _two_adapters(clip)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.base_model.merge_adapter()


@pytest.mark.parametrize(
    ("cls", "sub", "tower"),
    [
        (CLIPVisionModel, "vision_config", "vision"),
        (CLIPVisionModelWithProjection, "vision_config", "vision"),
        (CLIPTextModel, "text_config", "text"),
        (CLIPTextModelWithProjection, "text_config", "text"),
    ],
)
def test_single_tower_models(cls, sub, tower, batch, tmp_path):
    torch.manual_seed(0)
    config = getattr(tiny_clip_config(), sub)
    model = cls(config).eval()
    inputs = (
        {"pixel_values": batch["pixel_values"]} if tower == "vision" else {"input_ids": batch["input_ids"]}
    )
    base = model(**inputs).last_hidden_state if "WithProjection" not in cls.__name__ else None
    peft_model = get_peft_model(model, CFG, adapter_name="task")
    _randomise(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, MmAPLayer)]
    assert {m.tower for m in layers} == {tower} and len(layers) == LAYERS
    hidden = VISION_HIDDEN if tower == "vision" else TEXT_HIDDEN
    assert peft_model.get_nb_trainable_parameters()[0] == LAYERS * (16 + 2 * (hidden // 8))
    out = peft_model(**inputs)
    if base is not None:
        assert out.last_hidden_state.shape == base.shape
    out[0].sum().backward()
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(cls(config).eval(), tmp_path / "task", adapter_name="task")
    torch.testing.assert_close(reloaded(**inputs)[0], peft_model(**inputs)[0])


def test_mixed_routes_equal_per_task_batches(clip, batch):
    model = get_peft_model(clip, CFG, adapter_name="g")
    model.add_adapter("a", CFG)
    model.add_adapter("b", CFG)
    _randomise(model)
    pixels = batch["pixel_values"]
    per_task = []
    for i, task in enumerate(("a", "b")):
        model.base_model.set_adapter(["g", task])
        per_task.append(model.get_image_features(pixel_values=pixels[i : i + 1]).pooler_output)
    with model.base_model.adapter_routes([["g", "a"], ["g", "b"]]):
        mixed = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(mixed, torch.cat(per_task), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown adapter"), model.base_model.adapter_routes([["g", "nope"]]):
        pass


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (
            lambda: make_clip(text={"num_hidden_layers": 2}, vision={"num_hidden_layers": 2}),
            "unexpected weight",
        ),
        (
            lambda: make_clip(text={"hidden_size": 64, "intermediate_size": 64}),
            r"checkpoint \(2, 4\) vs model \(2, 8\)",
        ),
        (lambda: CLIPVisionModel(tiny_clip_config().vision_config), "unexpected weight .*text_model"),
    ],
    ids=["fewer-layers", "wider-text", "vision-only"],
)
def test_loading_onto_another_architecture_fails_cleanly(clip, tmp_path, target, match):
    get_peft_model(clip, CFG, adapter_name="a").save_pretrained(tmp_path)
    base = target()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_load_adapter_mismatch_keeps_existing_adapters(tmp_path, batch):
    small = get_peft_model(make_clip(), MmAPConfig(prompt_length=2, source_shape=(1, 8)), adapter_name="b")
    small.save_pretrained(tmp_path)
    model = _two_adapters(make_clip())
    expected = model(**batch).logits_per_image
    (tmp_path / "b" / "adapter_config.json").write_text(
        (tmp_path / "b" / "adapter_config.json")
        .read_text()
        .replace('"prompt_length": 2', '"prompt_length": 4')
    )
    with pytest.raises(ValueError, match="does not fit"):
        model.load_adapter(tmp_path / "b", adapter_name="b")
    assert sorted(model.peft_config) == ["art", "group0"]
    model.base_model.set_adapter(["group0", "art"])
    torch.testing.assert_close(model(**batch).logits_per_image, expected)


def test_every_factor_of_a_fresh_default_adapter_gets_a_gradient(clip, batch):
    """Issue 10: with the default config, P_s of every layer and both towers' M learn from the first step."""
    model = get_peft_model(clip, MmAPConfig())
    out = model(**batch, return_loss=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("mmap_source" in n for n in grads)
    assert any("text_model" in n and "mmap_scale" in n for n in grads)
    assert any("vision_model" in n and "mmap_scale" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None, name
        if "mmap_source" in name:  # (depth, m, n): every layer's source prompt
            assert (grad.flatten(1).abs().sum(-1) > 0).all(), name
        else:
            assert grad.abs().sum() > 0, name
