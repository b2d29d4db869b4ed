"""MmAPModel through PEFT's verbs: adapters, activation, gradients, save/load, unload, merge, tower types."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import (
    LAYERS,
    TEXT_HIDDEN,
    VISION_HIDDEN,
    assert_close_to_scale,
    make_clip,
    projection_loss,
    tiny_clip_config,
    with_placeholders,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from peft_mmap import MmAPConfig, MmAPLayer


def cfg(text_placement: str = "insert") -> MmAPConfig:
    """A fresh config (b=4, m×n=2×8): injection records the model's tower sizes on the config it is given."""
    return MmAPConfig(prompt_length=4, source_shape=(2, 8), text_placement=text_placement)


def _two_adapters(clip, text_placement: str = "insert"):
    model = get_peft_model(clip, cfg(text_placement), adapter_name="group0")
    model.add_adapter("art", cfg(text_placement))
    model.base_model.set_adapter(["group0", "art"])
    return model


PLACEMENTS = ["insert", "replace"]


def _inputs(batch, text_placement, prompt_tokens=8):
    """``batch``, with ``prompt_tokens`` placeholders after SOS where the text prompts replace them."""
    return with_placeholders(batch, prompt_tokens) if text_placement == "replace" else batch


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


@pytest.mark.parametrize("text_placement", PLACEMENTS)
def test_gradients_reach_active_adapters_only(clip, batch, text_placement):
    model = get_peft_model(clip, cfg(text_placement), adapter_name="group0")
    model.add_adapter("art", cfg(text_placement))
    model.add_adapter("clipart", cfg(text_placement))
    _randomise(model)  # zero-initialised scales would give the source prompts no gradient at step 0
    model.base_model.set_adapter(["group0", "art"])
    projection_loss(model(**_inputs(batch, text_placement)).logits_per_image).backward()
    for name, p in model.named_parameters():
        active = "mmap_" in name and name.split(".")[-1] in ("group0", "art")
        assert p.requires_grad == active, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == active, name


def test_inactive_adapters_are_untouched_by_training(clip, batch):
    model = get_peft_model(clip, cfg(), adapter_name="group0")
    model.add_adapter("art", cfg())
    model.add_adapter("clipart", cfg())
    _randomise(model)
    model.base_model.set_adapter(["group0", "art"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    projection_loss(model(**batch).logits_per_image).backward()
    opt.step()
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == ("mmap_" in key and key.split(".")[-1] in ("group0", "art")), key


@pytest.mark.parametrize("text_placement", PLACEMENTS)
def test_disable_adapter_gives_base_outputs_exactly(clip, batch, text_placement):
    batch = _inputs(batch, text_placement)
    base = clip(**batch).logits_per_image.clone()
    model = _two_adapters(clip, text_placement)
    _randomise(model)
    assert not torch.allclose(model(**batch).logits_per_image, base)
    with model.disable_adapter():
        assert torch.equal(model(**batch).logits_per_image, base)
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("text_placement", PLACEMENTS)
def test_save_load_round_trip_with_several_adapters(clip, batch, tmp_path, text_placement):
    batch = _inputs(batch, text_placement)
    model = _two_adapters(clip, text_placement)
    _randomise(model)
    expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path)
    for name in ("group0", "art"):
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert (saved["peft_type"], saved["text_placement"]) == ("MMAP", text_placement)
        keys = load_file(folder / "adapter_model.safetensors")
        assert sum("mmap_source" in k for k in keys) == 1
        assert sum("mmap_scale" in k for k in keys) == 2 * LAYERS == len(keys) - 1  # no position table
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    fresh = make_clip()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "group0", adapter_name="group0")
    loaded.load_adapter(tmp_path / "art", adapter_name="art")
    loaded.base_model.set_adapter(["group0", "art"], inference_mode=True)
    assert {c.text_placement for c in loaded.peft_config.values()} == {text_placement}
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


def test_with_every_adapter_deleted_the_model_runs_as_the_base_model(clip, batch):
    expected = clip(**batch).logits_per_image.clone()
    model = _two_adapters(clip)
    _randomise(model)
    assert not torch.allclose(model(**batch).logits_per_image, expected)
    model.delete_adapter("art")
    model.delete_adapter("group0")
    assert model.active_adapters == [] and not model.base_model.mmap_source
    # Every MmAPLayer runs its base layer's own forward, so the outputs are the base model's exactly. (The
    # PeftModel itself, whose `active_adapter` still names the deleted adapter, then fails in PEFT's own
    # `active_peft_config` / `has_active_enabled_adapter`, as it does for LoRA: the tuner is called here.)
    assert torch.equal(model.base_model(**batch).logits_per_image, expected)
    assert torch.equal(model.base_model.model(**batch).logits_per_image, expected)


def test_unload_returns_the_untouched_base_model(clip, batch):
    base_state = {k: v.clone() for k, v in clip.state_dict().items()}
    expected = clip(**batch).logits_per_image.clone()
    model = _two_adapters(clip)
    _randomise(model)
    base = model.unload()
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")  # as PEFT's unload: a plain transformers model again
    assert base.state_dict().keys() == base_state.keys()
    assert torch.equal(base(**batch).logits_per_image, expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewrapped = get_peft_model(base, cfg(), adapter_name="again")
    assert not [w for w in caught if "peft_config" in str(w.message)]
    assert list(rewrapped.peft_config) == ["again"]


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
    peft_model = get_peft_model(model, cfg(), adapter_name="task")
    _randomise(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, MmAPLayer)]
    assert {m.tower for m in layers} == {tower} and len(layers) == LAYERS
    hidden = VISION_HIDDEN if tower == "vision" else TEXT_HIDDEN
    assert peft_model.get_nb_trainable_parameters()[0] == LAYERS * (16 + 2 * (hidden // 8))
    out = peft_model(**inputs)
    if base is not None:
        assert out.last_hidden_state.shape == base.shape
    projection_loss(out[0]).backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(cls(config).eval(), tmp_path / "task", adapter_name="task")
    torch.testing.assert_close(reloaded(**inputs)[0], peft_model(**inputs)[0])


@pytest.mark.parametrize("text_placement", PLACEMENTS)
def test_mixed_routes_equal_per_task_batches(clip, batch, text_placement):
    """Routes choose the vision prompts per sample; the text tower uses the adapters of the call."""
    model = get_peft_model(clip, cfg(text_placement), adapter_name="g")
    model.add_adapter("a", cfg(text_placement))
    model.add_adapter("b", cfg(text_placement))
    _randomise(model)
    inputs = _inputs(batch, text_placement)
    per_task = []
    for i, task in enumerate(("a", "b")):
        model.base_model.set_adapter(["g", task])
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        out = model(**row)
        per_task.append((out.image_embeds, out.text_embeds))
    model.base_model.set_adapter(["g", "a"])
    with model.base_model.adapter_routes([["g", "a"], ["g", "b"]]):
        mixed = model(**inputs)
    assert_close_to_scale(mixed.image_embeds, torch.cat([image for image, _ in per_task]))
    assert_close_to_scale(mixed.text_embeds[:1], per_task[0][1])  # text: adapters g and a for every row
    with pytest.raises(ValueError, match="Unknown adapter"), model.base_model.adapter_routes([["g", "nope"]]):
        pass


def test_adapters_chosen_per_call_equal_set_adapter_and_change_no_state(clip, batch):
    model = _two_adapters(clip)
    model.add_adapter("b", cfg())
    _randomise(model)
    model.base_model.set_adapter(["group0", "art"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with model.base_model.use_adapters(["group0", "b"]):
        per_call = model(**batch)
    via_peft = model(**batch, adapter_names=["group0", "b"])  # PeftModel.forward's per-call argument
    assert model.active_adapters == ["group0", "art"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    active = model(**batch)
    model.base_model.set_adapter(["group0", "b"])
    expected = model(**batch)
    torch.testing.assert_close(per_call.logits_per_image, expected.logits_per_image)
    torch.testing.assert_close(via_peft.logits_per_image, expected.logits_per_image)
    assert not torch.allclose(active.logits_per_image, expected.logits_per_image)
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.base_model.use_adapters(["nope"])


SAVED_FOR = "was saved for a model with text hidden 32 / vision hidden 48 / 3 layers; this model has "
OTHER_BASES = {
    "fewer-layers": (
        lambda: make_clip(text={"num_hidden_layers": 2}, vision={"num_hidden_layers": 2}),
        "text hidden 32 / vision hidden 48 / 2 layers",
        "unexpected weight",
    ),
    "wider-text": (
        lambda: make_clip(text={"hidden_size": 64, "intermediate_size": 64}),
        "text hidden 64 / vision hidden 48 / 3 layers",
        r"checkpoint \(2, 4\) vs model \(2, 8\)",
    ),
    "deeper-vision": (
        lambda: make_clip(vision={"num_hidden_layers": 4}),
        "text hidden 32, 3 layers / vision hidden 48, 4 layers",
        None,  # every weight fits (depth 3 <= 3 text layers): only the recorded sizes tell
    ),
    "vision-only": (
        lambda: CLIPVisionModel(tiny_clip_config().vision_config),
        "vision hidden 48 / 3 layers / no text tower",
        "unexpected weight .*text_model",
    ),
}


def _forget_tower_sizes(folder):
    """Turn a saved adapter into one saved before `MmAPConfig.tower_sizes` existed."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["tower_sizes"]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_loading_onto_another_base_is_refused_naming_its_sizes(clip, tmp_path, case):
    target, sizes, _ = OTHER_BASES[case]
    get_peft_model(clip, cfg(), adapter_name="one").save_pretrained(tmp_path)
    base = target()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=f"MmAP adapter 'one' {SAVED_FOR}{sizes}\\."):
        PeftModel.from_pretrained(base, tmp_path / "one", adapter_name="one")
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_configs_without_tower_sizes_still_load_and_are_checked_by_shape(clip, batch, tmp_path, case):
    target, _, shape_problem = OTHER_BASES[case]
    model = get_peft_model(clip, cfg(), adapter_name="one")
    _randomise(model)
    model.save_pretrained(tmp_path)
    _forget_tower_sizes(tmp_path / "one")
    loaded = PeftModel.from_pretrained(make_clip(), tmp_path / "one", adapter_name="one")
    torch.testing.assert_close(loaded(**batch).logits_per_image, model(**batch).logits_per_image)
    base = target()
    if shape_problem is None:  # the weights fit: an old config cannot tell this base from the right one
        PeftModel.from_pretrained(base, tmp_path / "one", adapter_name="one")
        return
    with pytest.raises(ValueError, match=f"does not fit this base model .*({shape_problem})"):
        PeftModel.from_pretrained(base, tmp_path / "one", adapter_name="one")
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())


def test_injection_records_the_tower_sizes_on_the_config_it_was_given(tmp_path):
    config = MmAPConfig(prompt_length=4, source_shape=(2, 8))
    model = get_peft_model(make_clip(), config, adapter_name="one")
    model.save_pretrained(tmp_path)
    expected = {
        "text": {"hidden_size": TEXT_HIDDEN, "num_layers": LAYERS},
        "vision": {"hidden_size": VISION_HIDDEN, "num_layers": LAYERS},
    }
    assert model.peft_config["one"] is config and config.tower_sizes == expected  # as PEFT keeps its configs
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["tower_sizes"] == expected
    vision_only = CLIPVisionModel(tiny_clip_config().vision_config)
    with pytest.raises(ValueError, match=r"needs a config without tower_sizes .*dataclasses\.replace"):
        get_peft_model(vision_only, config)
    fresh = dataclasses.replace(config, tower_sizes=None)
    assert get_peft_model(vision_only, fresh).peft_config["default"].tower_sizes == {
        "vision": expected["vision"]
    }


def test_a_failed_injection_leaves_the_config_as_it_was(clip):
    config = MmAPConfig(prompt_length=4, source_shape=(2, 8), target_modules=["text_projection"])
    with pytest.raises(ValueError, match="MmAP can only wrap the encoder layers of a supported dual encoder"):
        get_peft_model(clip, config)
    assert config.tower_sizes is None


def test_from_pretrained_keeps_the_config_object_it_was_given(clip, batch, tmp_path):
    """PEFT's generic test: ``PeftModel.from_pretrained(model, path, config=config)`` uses ``config`` itself."""
    model = get_peft_model(clip, cfg())
    _randomise(model)
    model.save_pretrained(tmp_path)
    config = MmAPConfig(prompt_length=4, source_shape=(2, 8))
    loaded = PeftModel.from_pretrained(make_clip(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    torch.testing.assert_close(loaded(**batch).logits_per_image, model(**batch).logits_per_image)


def test_load_adapter_mismatch_keeps_existing_adapters(tmp_path, batch):
    small = get_peft_model(make_clip(), MmAPConfig(prompt_length=2, source_shape=(1, 8)), adapter_name="two")
    small.save_pretrained(tmp_path)
    model = _two_adapters(make_clip())
    expected = model(**batch).logits_per_image
    (tmp_path / "two" / "adapter_config.json").write_text(
        (tmp_path / "two" / "adapter_config.json")
        .read_text()
        .replace('"prompt_length": 2', '"prompt_length": 4')
    )
    with pytest.raises(ValueError, match="does not fit"):
        model.load_adapter(tmp_path / "two", adapter_name="two")
    assert sorted(model.peft_config) == ["art", "group0"]
    model.base_model.set_adapter(["group0", "art"])
    torch.testing.assert_close(model(**batch).logits_per_image, expected)


def test_load_adapter_for_another_base_is_refused_before_anything_changes(tmp_path, batch):
    wide = make_clip(text={"hidden_size": 64, "intermediate_size": 64})
    get_peft_model(wide, cfg(), adapter_name="wide").save_pretrained(tmp_path)
    model = _two_adapters(make_clip())
    _randomise(model)
    expected = model(**batch).logits_per_image
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="'wide' was saved for a model with text hidden 64 / vision hidden 48"
    ):
        model.load_adapter(tmp_path / "wide", adapter_name="wide")
    assert sorted(model.peft_config) == ["art", "group0"]
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(**batch).logits_per_image, expected)


@pytest.mark.parametrize(
    ("case", "shape_problem"),
    [
        ("wider-text", r"has shape \(2, 8\), but this base model expects \(2, 4\)"),
        ("fewer-layers", "missing weight"),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_is_refused_before_the_model_is_touched(
    tmp_path, monkeypatch, case, shape_problem
):
    """Only the weights' shapes tell (a config saved without ``tower_sizes``): still nothing changes."""
    target = OTHER_BASES[case][0]
    get_peft_model(target(), cfg(), adapter_name="other").save_pretrained(tmp_path)
    _forget_tower_sizes(tmp_path / "other")
    model = _two_adapters(make_clip())
    _randomise(model)
    model.base_model.set_requires_grad("art", False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers_changed = []
    monkeypatch.setattr(MmAPLayer, "update_layer", lambda *args: layers_changed.append(args))
    with pytest.raises(ValueError, match=f"'other' does not fit this base model .*({shape_problem})"):
        model.load_adapter(tmp_path / "other", adapter_name="other")
    assert layers_changed == []
    assert sorted(model.peft_config) == ["art", "group0"]
    assert model.active_adapters == ["group0", "art"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def _serve_hub(monkeypatch, download):
    """Route PEFT's and our ``hf_hub_download`` calls to ``download(repo_id, filename, subfolder, **kw)``."""
    import huggingface_hub
    import peft.config

    monkeypatch.setattr(peft.config, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_a_hub_checkpoint_is_checked_before_the_model_is_touched(tmp_path, monkeypatch):
    """``PeftModel.from_pretrained(base, "user/repo")`` with a config saved without ``tower_sizes``: the
    weights file is fetched with the config, so a misfit is refused before injection and a damaged file is
    named (the Hub is a local folder served through ``hf_hub_download``)."""
    get_peft_model(OTHER_BASES["wider-text"][0](), cfg()).save_pretrained(tmp_path)
    _forget_tower_sizes(tmp_path)
    fetched = []

    def download(repo_id, filename, subfolder=None, **kwargs):
        assert repo_id == "user/mmap-adapter", repo_id
        fetched.append(filename)
        return str(tmp_path / (subfolder or "") / filename)

    _serve_hub(monkeypatch, download)
    base = make_clip()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this base model .*expects \(2, 4\)"):
        PeftModel.from_pretrained(base, "user/mmap-adapter")
    assert "adapter_model.safetensors" in fetched
    assert not any(isinstance(m, MmAPLayer) for m in base.modules())
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"MmAP adapter weights file .*adapter_model\.safetensors"):
        PeftModel.from_pretrained(make_clip(), "user/mmap-adapter")


def test_a_hub_repository_without_safetensors_weights_is_left_to_peft(tmp_path, monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError

    get_peft_model(make_clip(), cfg()).save_pretrained(tmp_path)

    def download(repo_id, filename, subfolder=None, **kwargs):
        if filename == "adapter_model.safetensors":
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(tmp_path / filename)

    _serve_hub(monkeypatch, download)
    config = MmAPConfig.from_pretrained("user/mmap-adapter")
    assert config.prompt_length == cfg().prompt_length and not hasattr(config, "checkpoint_shapes")


# ---- PEFT conformance: the expectations PEFT's own tests check for LoRA --------------------------------
METHODS = {
    "lora": lambda: LoraConfig(target_modules=["q_proj", "v_proj"], r=2),
    "mmap": lambda: MmAPConfig(prompt_length=4, source_shape=(2, 8), scale_init="normal"),
}


def _config(method: str):
    """A fresh config of ``method`` (LoRA on the same CLIP is the reference for PEFT's expectations)."""
    return METHODS[method]()


def trainable_by_adapter(model) -> dict[str, set[bool]]:
    """``requires_grad`` of every adapter parameter by adapter name (``{"one": {True}}``: all trainable).

    An adapter parameter is named ``...<lora_X|mmap_X>.<adapter>[...]``; every other parameter must be frozen.
    """
    flags: dict[str, set[bool]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        owner = next((i for i, part in enumerate(parts[:-1]) if part.startswith(("lora_", "mmap_"))), None)
        if owner is None:
            assert not param.requires_grad, f"base parameter {name} is trainable"
        else:
            flags.setdefault(parts[owner + 1], set()).add(param.requires_grad)
    return flags


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Adapters ``one`` and ``two`` of each method, saved with PEFT (``<method>/one``, ``<method>/two``)."""
    root = tmp_path_factory.mktemp("saved")
    for method in METHODS:
        model = get_peft_model(make_clip(), _config(method), adapter_name="one")
        model.add_adapter("two", _config(method))
        model.save_pretrained(root / method)
    return root


def _load(root, a_trainable, b_trainable):
    model = PeftModel.from_pretrained(make_clip(), root / "one", adapter_name="one", is_trainable=a_trainable)
    model.load_adapter(root / "two", adapter_name="two", is_trainable=b_trainable)
    return model


def _add(method, *names):
    model = get_peft_model(make_clip(), _config(method), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _config(method))
    return model


def _then(model, *steps):
    for step in steps:
        step(model)
    return model


TRAINABILITY = {
    # name: (build(method, saved folder of the method), expected trainability)
    "get_peft_model": (lambda m, root: _add(m, "one"), {"one": {True}}),
    "add_adapter": (lambda m, root: _add(m, "one", "two"), {"one": {True}, "two": {False}}),
    "add_adapter keeps a frozen adapter frozen": (
        lambda m, root: _then(
            _add(m, "one"),
            lambda x: x.set_requires_grad("one", False),
            lambda x: x.add_adapter("two", _config(m)),
        ),
        {"one": {False}, "two": {False}},
    ),
    "add_adapter keeps an inactive trainable adapter trainable": (
        lambda m, root: _then(
            _add(m, "one", "two"),
            lambda x: x.set_requires_grad("two"),
            lambda x: x.add_adapter("three", _config(m)),
        ),
        {"one": {True}, "two": {True}, "three": {False}},
    ),
    "load trainable, then frozen": (
        lambda m, root: _load(root, True, False),
        {"one": {True}, "two": {False}},
    ),
    "load frozen, then trainable": (
        lambda m, root: _load(root, False, True),
        {"one": {False}, "two": {True}},
    ),
    "load trainable, then trainable": (
        lambda m, root: _load(root, True, True),
        {"one": {True}, "two": {True}},
    ),
    "load frozen, then frozen": (lambda m, root: _load(root, False, False), {"one": {False}, "two": {False}}),
    "set_adapter": (
        lambda m, root: _then(_load(root, True, False), lambda x: x.set_adapter("two")),
        {"one": {False}, "two": {True}},
    ),
    "set_adapter in inference mode": (
        lambda m, root: _then(
            _load(root, True, True), lambda x: x.base_model.set_adapter("two", inference_mode=True)
        ),
        {"one": {False}, "two": {False}},
    ),
    "delete the active adapter": (
        lambda m, root: _then(_load(root, False, False), lambda x: x.delete_adapter("one")),
        {"two": {True}},
    ),
}


@pytest.mark.parametrize("case", list(TRAINABILITY))
def test_trainability_matrix_matches_lora(saved_adapters, case):
    """Adding, loading, activating or deleting an adapter changes exactly the trainability PEFT's LoRA does:
    every parameter of the other adapters keeps its ``requires_grad``, ``is_trainable`` applies to the
    loaded adapter alone, and an adapter's source prompts always follow its scaling matrices."""
    build, expected = TRAINABILITY[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note when the active adapter is deleted
        got = {method: trainable_by_adapter(build(method, saved_adapters / method)) for method in METHODS}
    assert got["lora"] == expected  # the reference behaviour, on the same CLIP
    assert got["mmap"] == expected


def test_training_after_loading_a_frozen_second_adapter_updates_all_of_the_first(saved_adapters, batch):
    model = _load(saved_adapters / "mmap", True, False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mmap_" in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(**batch).logits_per_image.logsumexp(-1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in before:
            moved = not torch.equal(param, before[name])
            assert moved == name.endswith(".one"), name  # source prompts and scales of one, nothing of two


@pytest.mark.parametrize("is_trainable", [False, True])
def test_disable_adapter_context_restores_trainability(saved_adapters, batch, is_trainable):
    """Inside the context nothing is trainable (as LoRA); leaving it restores what was trainable before.

    A model loaded for inference stays frozen. LoRA in peft 0.21 makes its active adapter trainable there
    (huggingface/peft#3447, kept for backward compatibility); for a trainable model both agree.
    """
    base = make_clip()(**batch).logits_per_image
    model = _load(saved_adapters / "mmap", is_trainable, False)
    lora = _load(saved_adapters / "lora", is_trainable, False)
    before = trainable_by_adapter(model)
    assert before == {"one": {is_trainable}, "two": {False}}
    with model.disable_adapter(), lora.disable_adapter():
        assert trainable_by_adapter(model) == trainable_by_adapter(lora) == {"one": {False}, "two": {False}}
        assert torch.equal(model(**batch).logits_per_image, base)
    assert trainable_by_adapter(model) == before
    if is_trainable:
        assert trainable_by_adapter(lora) == before
    model.base_model.disable_adapter_layers()
    model.base_model.disable_adapter_layers()  # twice: the state from before the first time is kept
    model.base_model.enable_adapter_layers()
    assert trainable_by_adapter(model) == before
    model.base_model.enable_adapter_layers()  # enabling enabled adapters changes nothing
    assert trainable_by_adapter(model) == before


def test_trainability_chosen_inside_the_disable_context_is_kept(saved_adapters):
    model = _load(saved_adapters / "mmap", False, False)
    with model.disable_adapter():
        model.set_requires_grad("two")
    assert trainable_by_adapter(model) == {"one": {False}, "two": {True}}
    with model.disable_adapter():
        model.set_adapter("one")
    assert trainable_by_adapter(model) == {"one": {True}, "two": {False}}
    with model.disable_adapter():
        model.add_adapter("three", _config("mmap"))
    assert trainable_by_adapter(model) == {"one": {True}, "two": {False}, "three": {False}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_adapter_dtype_follows_autocast_adapter_dtype_as_for_lora(saved_adapters, batch, dtype, autocast):
    """``autocast_adapter_dtype=True`` (default) keeps adapter weights in fp32, False in the base dtype."""
    expected = torch.float32 if autocast else dtype

    def adapter_dtypes(model):
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n or "mmap_" in n}

    for method in METHODS:
        created = get_peft_model(make_clip().to(dtype), _config(method), autocast_adapter_dtype=autocast)
        created.add_adapter("two", _config(method), autocast_adapter_dtype=autocast)
        loaded = PeftModel.from_pretrained(
            make_clip().to(dtype),
            saved_adapters / method / "one",
            adapter_name="one",
            autocast_adapter_dtype=autocast,
        )
        loaded.load_adapter(
            saved_adapters / method / "two", adapter_name="two", autocast_adapter_dtype=autocast
        )
        for model in (created, loaded):
            assert adapter_dtypes(model) == {expected}, method
            assert {
                p.dtype for n, p in model.named_parameters() if "lora_" not in n and "mmap_" not in n
            } == {dtype}
        assert trainable_by_adapter(created) == {"default": {True}, "two": {False}}, method
        assert trainable_by_adapter(loaded) == {"one": {False}, "two": {False}}, (
            method
        )  # casting keeps them frozen
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    assert loaded(**inputs).logits_per_image.dtype == dtype


@pytest.mark.parametrize("text_placement", PLACEMENTS)
def test_every_factor_of_a_fresh_default_adapter_gets_a_gradient(clip, batch, text_placement):
    """Issue 10: with the default config, P_s of every layer and both towers' M learn from the first step."""
    model = get_peft_model(clip, MmAPConfig(text_placement=text_placement))
    out = model(**_inputs(batch, text_placement, 4), return_loss=True)
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
