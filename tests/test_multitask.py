"""MultiTaskMmAP: task routing, logits, text-feature cache, mixed batches, manifest round trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import assert_close_to_scale, make_clip

from peft_mmap import MmAPConfig
from peft_mmap.classifier import TaskSpec
from peft_mmap.manifest import MANIFEST_NAME, RUN_ADAPTERS_DIR
from peft_mmap.multitask import MultiTaskMmAP

TASKS = [
    TaskSpec("art", ["cat", "dog", "bird"]),
    TaskSpec("clipart", ["cat", "dog"], template="a clipart of a {}."),
    TaskSpec("product", ["cup", "key", "bell", "car"]),
]
GROUPS = [["art", "clipart"], ["product"]]


@pytest.fixture
def model(tokenizer):
    m = MultiTaskMmAP(make_clip(), tokenizer, TASKS, GROUPS, MmAPConfig(prompt_length=2, source_shape=(1, 8)))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    return m.eval()


def test_adapters_per_task_and_logit_shapes(model):
    assert model.adapters_for("art") == ["group0", "art"]
    assert model.adapters_for("product") == ["group1", "product"]
    pixels = torch.randn(2, 3, 16, 16)
    assert model(pixels, "art").shape == (2, 3)
    assert model(pixels, "product").shape == (2, 4)
    with pytest.raises(KeyError, match=r"known tasks: \['art', 'clipart', 'product'\]"):
        model(pixels, "sketch")


def test_logits_equal_a_hand_built_clip_classifier(model, tokenizer):
    pixels = torch.randn(2, 3, 16, 16)
    logits = model(pixels, "clipart")
    peft = model.peft_model
    peft.base_model.set_adapter(["group0", "clipart"])
    tokens = tokenizer(
        ["a clipart of a cat.", "a clipart of a dog."],
        padding="max_length",
        max_length=20,
        return_tensors="pt",
    )
    out = peft(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    assert_close_to_scale(logits, out.logits_per_image)


def test_a_forward_call_chooses_the_adapters_once(model, monkeypatch):
    entered = []
    for_task = model.for_task
    monkeypatch.setattr(model, "for_task", lambda task: entered.append(task) or for_task(task))
    pixels = torch.randn(2, 3, 16, 16)
    model.clear_cache()
    logits = model(pixels, "art")
    assert entered == ["art"]
    model.peft_model.base_model.set_adapter(["group1", "product"])  # the active adapters do not matter
    torch.testing.assert_close(model(pixels, "art"), logits)


def test_text_features_are_cached_and_invalidated_by_updates(model):
    first = model.text_features("art")
    assert model.text_features("art") is first
    with torch.no_grad():
        model.peft_model.base_model.mmap_source["art"].add_(1.0)
    second = model.text_features("art")
    assert second is not first and not torch.allclose(second, first)


def test_training_mode_bypasses_the_cache_and_gets_gradients(model):
    model.train()
    loss = model(torch.randn(2, 3, 16, 16), "art").logsumexp(-1).sum()
    loss.backward()
    grads = {n.split(".")[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"group0", "art"}


def test_mixed_task_batch_equals_per_task_batches(model):
    pixels = torch.randn(4, 3, 16, 16)
    tasks = ["art", "product", "clipart", "art"]
    mixed = model(pixels, tasks)
    assert mixed.shape == (4, 4)
    for i, task in enumerate(tasks):
        single = model(pixels[i : i + 1], task)[0]
        assert_close_to_scale(mixed[i, : single.shape[0]], single)
        assert torch.isinf(mixed[i, single.shape[0] :]).all()


def test_empty_batch_and_bad_images(model):
    assert model(torch.zeros(0, 3, 16, 16), "art").shape == (0, 3)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 16, 16), "art")


def test_save_and_load_round_trip(model, tokenizer, tmp_path):
    pixels = torch.randn(2, 3, 16, 16)
    expected = {t: model(pixels, t) for t in model.tasks}
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["groups"] == GROUPS and manifest["adapters"] == [
        "group0",
        "group1",
        "art",
        "clipart",
        "product",
    ]
    assert (tmp_path / "README.md").is_file()
    for name in manifest["adapters"]:
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = MultiTaskMmAP.from_pretrained(make_clip(), tmp_path, tokenizer=tokenizer)
    for task, logits in expected.items():
        torch.testing.assert_close(loaded(pixels, task), logits)
    assert loaded.tasks["clipart"].template == "a clipart of a {}."


def test_a_run_folder_loads_like_its_adapters_folder(model, tokenizer, tmp_path):
    """``peft-mmap train --output run`` saves into ``run/adapters``; both folders load the same adapters."""
    model.save_pretrained(tmp_path / "run" / RUN_ADAPTERS_DIR)
    from_run = MultiTaskMmAP.from_pretrained(make_clip(), tmp_path / "run", tokenizer=tokenizer)
    from_adapters = MultiTaskMmAP.from_pretrained(
        make_clip(), tmp_path / "run" / RUN_ADAPTERS_DIR, tokenizer=tokenizer
    )
    assert from_run.manifest() == from_adapters.manifest() == model.manifest()
    state = from_adapters.state_dict()
    assert from_run.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[key]) for key, tensor in from_run.state_dict().items())
    with pytest.raises(
        FileNotFoundError, match="not a MultiTaskMmAP folder or a 'peft-mmap train' run folder"
    ):
        MultiTaskMmAP.from_pretrained(make_clip(), tmp_path, tokenizer=tokenizer)


def test_wrapping_clip_raises_no_warning(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiTaskMmAP(make_clip(), tokenizer, TASKS, GROUPS, MmAPConfig(prompt_length=2, source_shape=(1, 8)))


def test_groups_must_partition_the_tasks(tokenizer):
    with pytest.raises(ValueError, match="exactly once"):
        MultiTaskMmAP(make_clip(), tokenizer, TASKS, [["art"], ["product"]])
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskMmAP(make_clip(), tokenizer, TASKS, [["art", "clipart", "product", "x"]])


# ---- text_placement="replace": class prompts [SOS, T placeholders, class name + the template's end, EOS] ----


@pytest.fixture
def replacing(tokenizer):
    config = MmAPConfig(prompt_length=2, source_shape=(1, 8), text_placement="replace")
    m = MultiTaskMmAP(make_clip(), tokenizer, TASKS, GROUPS, config)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    return m.eval()


def test_replace_logits_equal_a_hand_built_clip_classifier_with_placeholders(replacing, tokenizer):
    """The task's 4 text prompt tokens (group and task adapters, b=2 each) take the place of "a clipart of a"."""
    pixels = torch.randn(2, 3, 16, 16)
    logits = replacing(pixels, "clipart")
    tokens = tokenizer(
        ["x x x x cat.", "x x x x dog."], padding="max_length", max_length=20, return_tensors="pt"
    )
    assert torch.equal(replacing.task_tokens("clipart")["input_ids"], tokens["input_ids"][:, :10])
    peft = replacing.peft_model
    peft.base_model.set_adapter(["group0", "clipart"])
    out = peft(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    assert_close_to_scale(logits, out.logits_per_image)
    inserted = MultiTaskMmAP(
        make_clip(), tokenizer, TASKS, GROUPS, MmAPConfig(prompt_length=2, source_shape=(1, 8))
    )
    inserted.load_state_dict(replacing.state_dict())
    assert not torch.allclose(inserted.eval()(pixels, "clipart"), logits, atol=1e-2)


def test_replace_mixed_task_batch_equals_per_task_batches(replacing):
    pixels = torch.randn(4, 3, 16, 16)
    tasks = ["art", "product", "clipart", "art"]
    mixed = replacing(pixels, tasks)
    for i, task in enumerate(tasks):
        single = replacing(pixels[i : i + 1], task)[0]
        assert_close_to_scale(mixed[i, : single.shape[0]], single)


def test_replace_save_and_load_round_trip_keeps_the_placement(replacing, tokenizer, tmp_path):
    pixels = torch.randn(2, 3, 16, 16)
    expected = {t: replacing(pixels, t) for t in replacing.tasks}
    replacing.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["mmap_config"]["text_placement"] == "replace"
    assert json.loads((tmp_path / "art" / "adapter_config.json").read_text())["text_placement"] == "replace"
    loaded = MultiTaskMmAP.from_pretrained(make_clip(), tmp_path, tokenizer=tokenizer)
    assert loaded.config.text_placement == "replace"
    for task, logits in expected.items():
        torch.testing.assert_close(loaded(pixels, task), logits)


def test_a_manifest_written_before_text_placement_existed_loads_as_insert(model, tokenizer, tmp_path):
    pixels = torch.randn(2, 3, 16, 16)
    expected = model(pixels, "art")
    model.save_pretrained(tmp_path)
    path = tmp_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    assert manifest["mmap_config"].pop("text_placement") == "insert"
    path.write_text(json.dumps(manifest))
    loaded = MultiTaskMmAP.from_pretrained(make_clip(), tmp_path, tokenizer=tokenizer)
    assert loaded.config.text_placement == "insert"
    torch.testing.assert_close(loaded(pixels, "art"), expected)


def test_replace_with_the_template_words_as_prompts_gives_zero_shot_logits():
    """Depth 1, ``P_s = 1`` (1×1): the group adapter's text scale holds the token embeddings of "a photo", the
    task adapter's those of "of a", so each class prompt is zero-shot CLIP's "a photo of a <class>."."""
    from transformers import CLIPTokenizer

    from peft_mmap.base_models import TINY_CLIP_NAME, load_clip_model, load_pretrained
    from peft_mmap.classifier import CLIPTaskClassifier

    tokenizer = load_pretrained(CLIPTokenizer, TINY_CLIP_NAME)
    tasks = [TaskSpec("pets", ["cat", "dog", "golden retriever"]), TaskSpec("things", ["alarm clock", "cup"])]
    config = MmAPConfig(prompt_length=2, source_shape=(1, 1), depth=1, text_placement="replace")
    model = MultiTaskMmAP(load_clip_model(TINY_CLIP_NAME), tokenizer, tasks, [["pets", "things"]], config)
    embeddings = model.clip_model.text_model.embeddings.token_embedding
    tuner = model.peft_model.base_model
    with torch.no_grad():
        for name, words in (("group0", "a photo"), ("pets", "of a"), ("things", "of a")):
            ids = tokenizer(words, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            tuner.mmap_source[name].fill_(1.0)
            tuner.model.text_model.encoder.layers[0].mmap_scale[name].copy_(embeddings(ids))
    zero_shot = CLIPTaskClassifier(load_clip_model(TINY_CLIP_NAME), tokenizer, tasks).eval()
    model.eval()
    for task in ("pets", "things"):
        assert_close_to_scale(model.text_features(task), zero_shot.text_features(task))


def test_replace_refuses_class_prompts_longer_than_the_text_encoder(tokenizer):
    config = MmAPConfig(prompt_length=4, source_shape=(2, 8), text_placement="replace")
    tasks = [TaskSpec("long", ["abcdefghijklmno"])]  # 4 placeholders + 16 characters + SOS/EOS > 20 positions
    model = MultiTaskMmAP(make_clip(), tokenizer, tasks, None, config)
    with pytest.raises(
        ValueError, match=r"Task 'long': 4 placeholder tokens \+ class prompts of up to 18 .* 20 positions"
    ):
        model.text_features("long")
