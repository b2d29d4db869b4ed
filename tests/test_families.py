"""MmAP on every supported family (CLIP, SigLIP, SigLIP 2 NaFlex, MetaCLIP 2), detected from the model.

Tiny random models built from each family's config classes (no download): the PEFT method, the classifier and
the multi-task model behave on each family as the CLIP tests require of CLIP.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_clip, projection_loss
from peft import PeftModel, get_peft_model
from test_hub import RecordingApi
from transformers import (
    MetaClip2Config,
    MetaClip2Model,
    MetaClip2TextModelWithProjection,
    MetaClip2VisionModelWithProjection,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
)

import peft_mmap
from peft_mmap import MmAPConfig, MultiTaskMmAP
from peft_mmap.baselines import build_method
from peft_mmap.classifier import CLIPTaskClassifier
from peft_mmap.families import model_family
from peft_mmap.manifest import MANIFEST_NAME
from peft_mmap.options import DEFAULT_TEMPLATE, SIGLIP_TEMPLATE
from peft_mmap.prompting import computing_prompt_rows

TEXT, VISION, LAYERS, TEXT_LENGTH = 32, 48, 3, 32
TEXT_TOWER = dict(
    hidden_size=TEXT, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=99,
    max_position_embeddings=TEXT_LENGTH, eos_token_id=98, bos_token_id=97, pad_token_id=0,
)  # fmt: skip
VISION_TOWER = dict(hidden_size=VISION, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4)
PATCH = 4  # NaFlex patch size: 3 * 4 * 4 values per patch
MAX_PATCHES = 16


def make_siglip(seed: int = 0, attn_implementation: str = "sdpa") -> SiglipModel:
    """A 3-layer SigLIP (text 32 wide, projected by its ``head`` to the vision width 48), 16 px images, with a
    nonzero logit bias."""
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config={**TEXT_TOWER, "projection_size": VISION},
        vision_config={**VISION_TOWER, "image_size": 16, "patch_size": 8},
    )
    config._attn_implementation = attn_implementation
    model = SiglipModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # initialised at zero; SigLIP checkpoints have a large negative bias
        model.logit_bias.fill_(-2.5)
    return model


def make_siglip2(seed: int = 0) -> Siglip2Model:
    """A 3-layer SigLIP 2 NaFlex model: images are up to 16 patches of 4x4 pixels."""
    torch.manual_seed(seed)
    config = Siglip2Config(
        text_config={**TEXT_TOWER, "projection_size": VISION},
        vision_config={**VISION_TOWER, "num_patches": MAX_PATCHES, "patch_size": PATCH},
    )
    return Siglip2Model(config).eval()


def make_metaclip2(seed: int = 0) -> MetaClip2Model:
    """A 3-layer MetaCLIP 2 (CLIP's architecture under its own classes), 16 px images."""
    torch.manual_seed(seed)
    config = MetaClip2Config(
        text_config=TEXT_TOWER,
        vision_config={**VISION_TOWER, "image_size": 16, "patch_size": 8},
        projection_dim=16,
    )
    return MetaClip2Model(config).eval()


BUILDERS = {"clip": make_clip, "siglip": make_siglip, "siglip2": make_siglip2, "metaclip2": make_metaclip2}
#: The families a task classifier serves (NaFlex images are patch sequences: refused there).
CLASSIFIER_FAMILIES = ("clip", "siglip", "metaclip2")


def naflex_pixels(shapes: list[tuple[int, int]], seed: int = 1) -> dict[str, torch.Tensor]:
    """NaFlex inputs: one image per ``(rows, cols)`` patch grid, padded to `MAX_PATCHES` patches."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(shapes), MAX_PATCHES, 3 * PATCH * PATCH)
    mask = torch.zeros(len(shapes), MAX_PATCHES, dtype=torch.long)
    for i, (rows, cols) in enumerate(shapes):
        pixels[i, : rows * cols] = torch.randn(rows * cols, 3 * PATCH * PATCH, generator=generator)
        mask[i, : rows * cols] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(shapes)}


def batch_for(family: str) -> dict[str, torch.Tensor]:
    """Two texts (one padded, with its mask) and two images, in the family's input format."""
    torch.manual_seed(1)
    texts = {
        "input_ids": torch.tensor([[97, 5, 6, 7, 98, 0], [97, 8, 98, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
    }
    if family == "siglip2":
        return {**texts, **naflex_pixels([(2, 3), (4, 4)])}
    return {**texts, "pixel_values": torch.randn(2, 3, 16, 16)}


def mmap_config() -> MmAPConfig:
    return MmAPConfig(prompt_length=4, source_shape=(2, 8))


def randomised(model: PeftModel) -> PeftModel:
    """``model`` with every MmAP factor drawn from N(0, 1), so that every prompt entry differs from zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mmap_" in name:
                p.normal_()
    return model


def features(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled text and image features ``(B, D)`` of the model's own ``forward``."""
    out = model(**batch)
    return out.text_embeds, out.image_embeds


# ---- the method layer ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "family", "towers"),
    [
        (lambda: make_clip(), "clip", {"text", "vision"}),
        (lambda: make_siglip(), "siglip", {"text", "vision"}),
        (lambda: make_siglip().text_model, "siglip", {"text"}),
        (lambda: make_siglip().vision_model, "siglip", {"vision"}),
        (lambda: make_siglip2(), "siglip2", {"text", "vision"}),
        (lambda: make_siglip2().vision_model, "siglip2", {"vision"}),
        (lambda: make_metaclip2(), "metaclip2", {"text", "vision"}),
        (lambda: MetaClip2TextModelWithProjection(make_metaclip2().config.text_config), "metaclip2", {"text"}),
        (lambda: MetaClip2VisionModelWithProjection(make_metaclip2().config.vision_config), "metaclip2", {"vision"}),
    ],
    ids=[
        "CLIPModel", "SiglipModel", "SiglipTextModel", "SiglipVisionModel", "Siglip2Model", "Siglip2VisionModel",
        "MetaClip2Model", "MetaClip2TextModelWithProjection", "MetaClip2VisionModelWithProjection",
    ],
)  # fmt: skip
def test_the_family_and_tower_sizes_are_read_from_the_model(model, family, towers):
    base = model()
    assert model_family(base).name == family
    peft_model = get_peft_model(base, mmap_config())
    sizes = peft_model.peft_config["default"].tower_sizes
    assert set(sizes) == towers
    width = {"text": TEXT, "vision": VISION}
    assert sizes == {t: {"hidden_size": width[t], "num_layers": LAYERS} for t in towers}
    layers = [m for m in peft_model.modules() if isinstance(m, peft_mmap.MmAPLayer)]
    assert len(layers) == LAYERS * len(towers)


def test_a_model_of_no_supported_family_is_refused_naming_the_classes():
    with pytest.raises(
        ValueError, match=r"Linear holds none of their towers \(CLIPTextModel, .*SiglipTextModel"
    ):
        get_peft_model(torch.nn.Linear(2, 2), mmap_config())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_disable_adapter_gives_exactly_the_base_outputs(family):
    batch = batch_for(family)
    base = BUILDERS[family]().requires_grad_(False)  # frozen as PEFT freezes it: SigLIP's attention-pooling
    # head (nn.MultiheadAttention) computes with other kernels when its weights require grad, even under no_grad
    with torch.no_grad():
        want = base(**batch).logits_per_image.clone()
        model = randomised(get_peft_model(base, mmap_config()))
        assert not torch.allclose(model(**batch).logits_per_image, want)
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits_per_image, want)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_prompts_change_the_pooled_features_and_every_factor_gets_a_gradient(family):
    batch = batch_for(family)
    base = BUILDERS[family]()
    with torch.no_grad():
        text0, image0 = features(base, batch)
    model = randomised(get_peft_model(base, mmap_config()))
    text, image = features(model, batch)
    assert not torch.allclose(text, text0, atol=1e-3) and not torch.allclose(image, image0, atol=1e-3)
    (projection_loss(text) + projection_loss(image, seed=1)).backward()
    factors = {name: p for name, p in model.named_parameters() if "mmap_" in name}
    assert len(factors) == 1 + 2 * LAYERS  # the source prompts and each layer's scaling matrix
    for name, p in factors.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for name, p in model.named_parameters() if "mmap_" not in name)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_factor_of_a_fresh_default_adapter_gets_a_gradient(family):
    """The default init (text scales at one, vision scales at zero) trains every factor from the first step."""
    model = get_peft_model(BUILDERS[family](), MmAPConfig(source_shape=(2, 8)))
    text, image = features(model, batch_for(family))
    (projection_loss(text) + projection_loss(image, seed=1)).backward()
    for name, p in model.named_parameters():
        if "mmap_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["siglip", "siglip2", "metaclip2"])
def test_skipping_the_prompt_rows_computes_what_the_layers_compute(family, attn_implementation):
    """The re-stated layer forward (prompts give keys and values only) equals each family's own layers, with
    a padded text batch (a 4-D mask: bidirectional for SigLIP, causal for MetaCLIP 2)."""
    base = BUILDERS[family]()
    base.set_attn_implementation(attn_implementation)
    model = randomised(get_peft_model(base, mmap_config()))
    batch = batch_for(family)
    with torch.no_grad():
        fast = model(**batch)
        with computing_prompt_rows():
            full = model(**batch)
    for got, want in [(fast.text_embeds, full.text_embeds), (fast.image_embeds, full.image_embeds)]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_pooled_position_and_the_vision_head_see_no_prompt_token(family):
    """What pooling reads, each tower's encoder output (the text tower's last or EOS position; CLIP's CLS, or
    every patch for SigLIP's attention-pooling head, whose input is checked too) has the base model's sequence
    length, and the prompts changed it."""
    base = BUILDERS[family]()
    batch = batch_for(family)
    with torch.no_grad():
        want = base(**batch)
    model = randomised(get_peft_model(base, mmap_config()))
    seen = {}

    def record(name: str):
        return lambda module, args, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    modules = {"text": base.text_model.encoder, "vision": base.vision_model.encoder}
    if hasattr(base.vision_model, "head"):
        modules["head"] = base.vision_model.head
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("head", args[0]), with_kwargs=True
        )
        if name == "head"
        else module.register_forward_hook(record(name))
        for name, module in modules.items()
    ]
    with torch.no_grad():
        got = model(**batch)
    for handle in handles:
        handle.remove()
    text, vision = want.text_model_output, want.vision_model_output
    assert seen["text"].last_hidden_state.shape == text.last_hidden_state.shape
    assert seen["vision"].last_hidden_state.shape[:2] == vision.last_hidden_state.shape[:2]
    if "head" in seen:  # SigLIP: the head pools post_layernorm's output, every patch and nothing else
        assert seen["head"].shape == vision.last_hidden_state.shape
    assert not torch.allclose(got.text_embeds, want.text_embeds, atol=1e-3)
    assert not torch.allclose(got.image_embeds, want.image_embeds, atol=1e-3)


def test_siglip_text_pools_the_last_position_as_the_model_does():
    """SigLIP pools ``last_hidden_state[:, -1]`` then ``head``: with prompts, the pooled output is still that of
    the last real position of the sequence the model was given."""
    model = randomised(get_peft_model(make_siglip(), mmap_config()))
    ids = torch.tensor([[5, 6, 7, 98, 98, 98, 98, 98, 98, 98, 98, 98]])  # padded the processor's way
    with torch.no_grad():
        out = model.get_base_model().text_model(input_ids=ids)
        head = model.get_base_model().text_model.head
        torch.testing.assert_close(out.pooler_output, head(out.last_hidden_state[:, -1]))
        assert out.last_hidden_state.shape[1] == ids.shape[1]


@pytest.mark.parametrize("depth", [None, 1], ids=["deep", "depth1"])
def test_naflex_prompts_are_visible_to_every_real_patch_whatever_the_padding(depth):
    """SigLIP 2 NaFlex: an image's features do not depend on how many padding patches its batch adds, with
    prompts, because every real patch sees the prompts and no padding patch, and the head pools real patches.
    At depth 1 the prompts flow through the later layers, so what the prompts themselves see counts too."""
    model = randomised(get_peft_model(make_siglip2(), dataclasses.replace(mmap_config(), depth=depth)))
    vision = model.get_base_model()
    alone = naflex_pixels([(2, 3)])
    alone = {k: v[:, :6] if k != "spatial_shapes" else v for k, v in alone.items()}  # exactly its 6 patches
    padded = naflex_pixels([(2, 3), (4, 4)])
    with torch.no_grad():
        one = vision.get_image_features(**alone).pooler_output
        two = vision.get_image_features(**padded).pooler_output
        with model.disable_adapter():
            plain = vision.get_image_features(**alone).pooler_output
    torch.testing.assert_close(one[0], two[0], rtol=1e-4, atol=1e-4 * two.abs().max().item())
    assert not torch.allclose(one, plain, atol=1e-3)


@pytest.mark.parametrize("depth", [None, 1], ids=["deep", "depth1"])
@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_a_bidirectional_text_with_a_padding_mask_equals_the_text_without_padding(family, depth):
    """SigLIP's text tower with an attention mask: the real tokens' states are those of the unpadded text, with
    prompts (which every token sees, and which see every real token) at every depth."""
    model = randomised(get_peft_model(BUILDERS[family](), dataclasses.replace(mmap_config(), depth=depth)))
    text = model.get_base_model().text_model
    ids = torch.tensor([[5, 6, 7, 98]])
    padded = torch.tensor([[5, 6, 7, 98, 0, 0]])
    with torch.no_grad():
        want = text(input_ids=ids).last_hidden_state
        got = text(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).last_hidden_state
    torch.testing.assert_close(got[:, :4], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_siglip2_vision_model_takes_adapters_and_is_refused_by_the_classifier(tokenizer):
    assert get_peft_model(Siglip2VisionModel(make_siglip2().config.vision_config), mmap_config())
    with pytest.raises(
        ValueError, match=r"Siglip2Model \(SigLIP 2 \(NaFlex\)\) takes images as patch sequences"
    ):
        CLIPTaskClassifier(make_siglip2(), tokenizer, {"colours": ["red", "blue"]})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_save_load_and_hub_round_trip_give_identical_logits(family, tmp_path):
    batch = batch_for(family)
    model = randomised(get_peft_model(BUILDERS[family](), mmap_config(), adapter_name="group0"))
    model.add_adapter("art", mmap_config())
    randomised(model).base_model.set_adapter(["group0", "art"])
    with torch.no_grad():
        want = model(**batch).logits_per_image
    model.save_pretrained(tmp_path / "saved")
    api = RecordingApi()
    peft_mmap.push_to_hub(model, "me/family-mmap", api=api)
    for path, data in api.files.items():  # what a download of the repository gives
        (tmp_path / "hub" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "hub" / path).write_bytes(data)
    assert f"- {family}" in api.files["README.md"].decode()
    for folder in (tmp_path / "saved", tmp_path / "hub"):
        loaded = PeftModel.from_pretrained(BUILDERS[family](), folder / "group0", adapter_name="group0")
        loaded.load_adapter(folder / "art", adapter_name="art")
        loaded.base_model.set_adapter(["group0", "art"])
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits_per_image, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_unload_gives_back_the_untouched_base_model_and_merging_is_refused(family):
    batch = batch_for(family)
    base = BUILDERS[family]().requires_grad_(False)
    with torch.no_grad():
        want = base(**batch).logits_per_image.clone()
    model = randomised(get_peft_model(base, mmap_config()))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not any(isinstance(m, peft_mmap.MmAPLayer) for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(**batch).logits_per_image, want)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_per_call_adapters_and_mixed_routes_equal_set_adapter(family):
    """``adapter_names=`` per call and per-sample vision routes give what ``set_adapter`` gives."""
    batch = batch_for(family)
    model = get_peft_model(BUILDERS[family](), mmap_config(), adapter_name="g")
    for name in ("art", "prod"):
        model.add_adapter(name, mmap_config())
    randomised(model)
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        per_task = []
        for task in ("art", "prod"):
            model.base_model.set_adapter(["g", task])
            per_task.append(model.get_image_features(**images).pooler_output)
        expected = model(**batch).logits_per_image  # ["g", "prod"] active
        model.base_model.set_adapter(["g", "art"])
        torch.testing.assert_close(model(**batch, adapter_names=["g", "prod"]).logits_per_image, expected)
        with model.base_model.adapter_routes([["g", "art"], ["g", "prod"]]):
            mixed = model.get_image_features(**images).pooler_output
    torch.testing.assert_close(mixed, torch.stack([per_task[0][0], per_task[1][1]]))


# ---- the multi-task layer --------------------------------------------------------------------------------
def siglip_style_tokenizer(tokenizer, folder: Path):
    """``tokenizer`` (the character-level CLIP tokenizer of the tests) configured as SigLIP's tokenizer is: no
    attention mask (SigLIP's tokenizer config gives ``model_input_names = ["input_ids"]``), EOS as padding.
    It stands in for SigLIP's SentencePiece tokenizer, which needs the sentencepiece package."""
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(folder)
    tok = CLIPTokenizer.from_pretrained(folder, model_input_names=["input_ids"], model_max_length=TEXT_LENGTH)
    assert tok.pad_token_id == tok.eos_token_id == 98
    return tok


@pytest.fixture(scope="module")
def siglip_tokenizer(tokenizer, tmp_path_factory):
    return siglip_style_tokenizer(tokenizer, tmp_path_factory.mktemp("siglip-tokenizer"))


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_zero_shot_logits_are_the_models_own(family, tokenizer, siglip_tokenizer):
    tok = siglip_tokenizer if family == "siglip" else tokenizer
    base = BUILDERS[family]()
    classifier = build_method("zeroshot", base, tok, {"colours": ["red", "green", "blue"]})
    spec = classifier.tasks["colours"]
    assert spec.template == (SIGLIP_TEMPLATE if family == "siglip" else DEFAULT_TEMPLATE)
    tokens = classifier.task_tokens("colours")
    if family == "siglip":  # padded to the text tower's length, without a mask, as SigLIP was trained
        assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape[1] == TEXT_LENGTH
    else:
        assert set(tokens) == {"input_ids", "attention_mask"}
    pixels = batch_for(family)["pixel_values"]
    with torch.no_grad():
        want = base(**tokens, pixel_values=pixels).logits_per_image
        got = classifier(pixels, "colours")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if family == "siglip":
        assert classifier.logit_bias is base.logit_bias


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_text_features_do_not_depend_on_the_other_prompts_of_the_batch(family, tokenizer, siglip_tokenizer):
    """Padding invariance: a class prompt's prompted features are the same alone or padded among a longer
    prompt (CLIP, MetaCLIP 2: padded to the longest, masked; SigLIP: always padded to its 32 positions)."""
    tok = siglip_tokenizer if family == "siglip" else tokenizer
    tasks = {"a": ["red", "blue-red"], "b": ["red"]}
    model = MultiTaskMmAP(BUILDERS[family](), tok, tasks, [["a", "b"]], mmap_config(), task_adapters=False)
    randomised(model.peft_model).eval()
    lengths = {task: model.task_tokens(task)["input_ids"].shape[1] for task in tasks}
    assert (lengths["a"] == lengths["b"]) == (family == "siglip")
    with torch.no_grad():
        together, alone = model.text_features("a"), model.text_features("b")
    torch.testing.assert_close(alone[0], together[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_multi_task_round_trip_with_task_switching(family, tokenizer, siglip_tokenizer, tmp_path):
    tok = siglip_tokenizer if family == "siglip" else tokenizer
    tasks = {"art": ["red", "green", "blue"], "product": ["red", "blue"]}
    model = MultiTaskMmAP(BUILDERS[family](), tok, tasks, [["art", "product"]], mmap_config())
    randomised(model.peft_model).eval()
    pixels = batch_for(family)["pixel_values"]
    with torch.no_grad():
        want = {task: model(pixels, task) for task in tasks}
        mixed = model(pixels, ["product", "art"])
    torch.testing.assert_close(mixed[0, :2], want["product"][0])
    torch.testing.assert_close(mixed[1], want["art"][1])
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    template = SIGLIP_TEMPLATE if family == "siglip" else DEFAULT_TEMPLATE
    assert [t["template"] for t in manifest["tasks"]] == [template, template]
    loaded = MultiTaskMmAP.from_pretrained(BUILDERS[family](), tmp_path, tokenizer=tok)
    with torch.no_grad():
        for task in ["art", "product", "art"]:  # switching back and forth
            torch.testing.assert_close(loaded(pixels, task), want[task], rtol=0, atol=0)
        with loaded.peft_model.disable_adapter():
            assert not torch.allclose(loaded(pixels, "art"), want["art"], atol=1e-3)


def test_task_specs_keep_their_own_templates_and_class_names_get_the_familys(siglip_tokenizer):
    from peft_mmap.classifier import TaskSpec

    tasks = [TaskSpec("art", ["red"], "a sketch of {}."), TaskSpec("clip_default", ["red"])]
    model = MultiTaskMmAP(make_siglip(), siglip_tokenizer, tasks, None)
    assert model.tasks["art"].template == "a sketch of {}."
    assert model.tasks["clip_default"].template == DEFAULT_TEMPLATE  # TaskSpec's own default
    model = MultiTaskMmAP(make_siglip(), siglip_tokenizer, {"art": ["red"]}, None)
    assert model.tasks["art"].template == SIGLIP_TEMPLATE


def test_replace_text_placement_is_refused_on_siglip_naming_insert(siglip_tokenizer):
    """SigLIP's text has no start token and pools its last padded position: no context positions 1..T."""
    config = MmAPConfig(prompt_length=2, source_shape=(1, 8), text_placement="replace")
    model = MultiTaskMmAP(make_siglip(), siglip_tokenizer, {"art": ["red", "blue"]}, None, config)
    with pytest.raises(ValueError, match=r"text_placement='replace'.*SigLIP.*use text_placement='insert'"):
        model(batch_for("siglip")["pixel_values"], "art")


def write_siglip_checkpoint(folder: Path, tokenizer) -> Path:
    """A tiny random SigLIP saved as a Hub checkpoint is: ``SiglipModel`` and ``SiglipProcessor`` (image
    processor, and ``tokenizer`` configured by `siglip_style_tokenizer`)."""
    from transformers import SiglipImageProcessorPil, SiglipProcessor

    tokenizer = siglip_style_tokenizer(tokenizer, folder)
    make_siglip().save_pretrained(folder)
    processor = SiglipProcessor(SiglipImageProcessorPil(size={"height": 16, "width": 16}), tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_fixed_resolution_siglip2_pads_as_its_gemma_tokenizer_does():
    """SigLIP 2 at fixed resolution is a ``SiglipModel`` with a Gemma tokenizer (``Siglip2Tokenizer``: left
    padding, with an attention mask): class prompts are padded its way to the text tower's length, the mask is
    passed on, and the logits are the model's own, with prompts too."""
    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab |= {c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz.-\u2581")}
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[])
    base = make_siglip()
    classifier = build_method("zeroshot", base, tokenizer, {"colours": ["red", "blue"]})
    tokens = classifier.task_tokens("colours")
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape[1] == TEXT_LENGTH
    assert tokens["attention_mask"][:, 0].tolist() == [0, 0] and tokens["attention_mask"][:, -1].tolist() == [
        1,
        1,
    ]
    pixels = batch_for("siglip")["pixel_values"]
    with torch.no_grad():
        want = base(**tokens, pixel_values=pixels).logits_per_image
        torch.testing.assert_close(
            classifier(pixels, "colours"), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()
        )
    model = MultiTaskMmAP(make_siglip(), tokenizer, {"colours": ["red", "blue"]}, None, mmap_config())
    randomised(model.peft_model).eval()
    with torch.no_grad():
        fast = model(pixels, "colours")
        model.clear_cache()
        with computing_prompt_rows():
            full = model(pixels, "colours")
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4 * full.abs().max().item())
    assert not torch.allclose(fast, want, atol=1e-3)
