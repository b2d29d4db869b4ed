"""Baseline registry: every method builds, classifies, trains only its own parameters and round-trips."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, make_clip

from peft_mmap.baselines import METHODS, build_method, load_trainable, save_trainable
from peft_mmap.baselines.mmap_variants import random_groups
from peft_mmap.classifier import TaskSpec
from peft_mmap.multitask import MultiTaskMmAP
from peft_mmap.prompting import computing_prompt_rows

TASKS = [
    TaskSpec("art", ["cat", "dog", "bird"]),
    TaskSpec("clipart", ["cat", "dog"], template="a clipart of a {}."),
    TaskSpec("product", ["cup", "key", "bell", "car"]),
]
GROUPS = [["art", "clipart"], ["product"]]
#: Options that differ from the defaults in a few methods, to exercise them (CoOp: its default 16 context
#: tokens do not fit the tiny text encoder's 20 positions with these class prompts).
OPTIONS = {
    "clip_adapter": {"per_task": True},
    "mlp_prompts": {"mlp_hidden": 8},
    "coop": {"n_ctx": 4},
    "coop_mt": {"n_ctx": 4},
}
#: SGD learning rates that move each method in 10 steps (default 0.5).
LEARNING_RATES = {"full_ft": 0.01, "full_ft_mt": 0.01, "clip_adapter": 5.0}
#: Which parameter names each kind of method may train.
TRAINABLE = {
    "zeroshot": lambda n: False,
    "full_ft": lambda n: not n.endswith("logit_scale"),
    "full_ft_mt": lambda n: not n.endswith("logit_scale"),
    "clip_adapter": lambda n: n.startswith("adapters."),
    "bitfit": lambda n: n.endswith(".bias"),
}


#: Methods without deep prompts.
UNPROMPTED = {"zeroshot", "full_ft", "full_ft_mt", "clip_adapter", "bitfit"}


def expected_trainable(method: str, name: str) -> bool:
    if method in TRAINABLE:
        return TRAINABLE[method](name)
    if method.startswith("mmap"):
        return "mmap_" in name
    return name.startswith("units.")


def build(name: str, tokenizer, seed: int = 0):
    """Method ``name`` on a fresh tiny CLIP; ``seed`` sets the method's own initialisation."""
    torch.manual_seed(seed)
    return build_method(name, make_clip(), tokenizer, TASKS, GROUPS, **OPTIONS.get(name, {}))


def separable_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two tasks; per task two noisy copies of one random image per class, and their labels."""
    generator = torch.Generator().manual_seed(0)
    data = {}
    for spec in (TASKS[0], TASKS[2]):
        k = len(spec.classnames)
        prototypes = torch.randn(k, 3, 16, 16, generator=generator)
        images = prototypes.repeat(2, 1, 1, 1) + 0.1 * torch.randn(2 * k, 3, 16, 16, generator=generator)
        data[spec.name] = (images, torch.arange(k).repeat(2))
    return data


def task_loss(model, data) -> torch.Tensor:
    return sum(F.cross_entropy(model(x, t), y) for t, (x, y) in data.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_logit_shapes_for_one_task_and_mixed_tasks(name, tokenizer):
    model = build(name, tokenizer).eval()
    pixels = torch.randn(4, 3, 16, 16)
    assert model(pixels[:2], "art").shape == (2, 3)
    assert model(pixels[:2], "product").shape == (2, 4)
    tasks = ["art", "product", "clipart", "art"]
    mixed = model(pixels, tasks)
    assert mixed.shape == (4, 4)
    for i, task in enumerate(tasks):
        single = model(pixels[i : i + 1], task)[0]
        assert_close_to_scale(mixed[i, : single.shape[0]], single)
        assert torch.isinf(mixed[i, single.shape[0] :]).all()


@pytest.mark.parametrize("name", [n for n in METHODS if n not in UNPROMPTED])
def test_skipping_discarded_prompt_rows_changes_no_loss_or_gradient(name, tokenizer):
    model = build(name, tokenizer).train()
    data = separable_data()
    results = []
    for context in (contextlib.nullcontext, computing_prompt_rows):
        model.zero_grad()
        with context():
            loss = task_loss(model, data)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 1
    for got, want in zip(*results, strict=True):
        assert_close_to_scale(got, want)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "zeroshot"])
def test_training_lowers_the_loss_and_touches_only_the_methods_parameters(name, tokenizer):
    model = build(name, tokenizer).train()
    data = separable_data()
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(expected_trainable(name, n) for n in names), sorted(names)[:5]
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATES.get(name, 0.5))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = task_loss(model, data)
        loss.backward()
        losses.append(loss.item())
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and with_grad <= names
        optimizer.step()
    assert losses[-1] < 0.99 * losses[0], losses


@pytest.mark.parametrize("name", ["coop", "vpt", "maple", "full_ft", "mmap"])
def test_a_task_loss_reaches_only_that_tasks_parameters(name, tokenizer):
    model = build(name, tokenizer).train()
    images, labels = separable_data()["art"]
    F.cross_entropy(model(images, "art"), labels).backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    others = ("clipart", "product", "group1")
    assert touched and not [n for n in touched for other in others if f".{other}." in f".{n}."], sorted(
        touched
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_save_and_load_trainable_round_trip(name, tmp_path, tokenizer):
    model = build(name, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    pixels = torch.randn(2, 3, 16, 16)
    expected = {t: model(pixels, t) for t in model.tasks}
    path = save_trainable(model, tmp_path / "trainable.safetensors")
    fresh = build(name, tokenizer, seed=1).eval()
    load_trainable(fresh, path)
    for task, logits in expected.items():
        torch.testing.assert_close(fresh(pixels, task), logits)


def test_load_trainable_refuses_another_methods_or_shapes_file(tmp_path, tokenizer):
    coop = build("coop", tokenizer)
    path = coop.save_trainable(tmp_path / "coop.safetensors")
    with pytest.raises(ValueError, match="missing"):
        build("vpt", tokenizer).load_trainable(path)
    other = build_method("coop", make_clip(), tokenizer, TASKS, n_ctx=3)
    with pytest.raises(ValueError, match="shape mismatch"):
        other.load_trainable(path)


@pytest.mark.parametrize("name", list(METHODS))
def test_trainable_count_equals_the_closed_form(name, tokenizer):
    model = build(name, tokenizer)
    formula = METHODS[name].parameters(make_clip().config, len(TASKS), len(GROUPS), **OPTIONS.get(name, {}))
    assert model.trainable_parameter_count() == formula


def test_zeroshot_equals_a_hand_computed_clip_classifier(tokenizer):
    clip = make_clip()
    model = build_method("zeroshot", make_clip(), tokenizer, TASKS).eval()
    pixels = torch.randn(3, 3, 16, 16)
    spec = TASKS[1]
    tokens = tokenizer(spec.prompts, padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        image = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected = clip.logit_scale.exp() * image @ text.t()
        out = clip(**tokens, pixel_values=pixels).logits_per_image
    assert_close_to_scale(model(pixels, spec.name), expected)
    assert_close_to_scale(model(pixels, spec.name), out)
    assert model.trainable_parameter_count() == 0


@pytest.mark.parametrize("name", ["coop", "maple", "joint_prompts"])
def test_prompted_text_features_do_not_depend_on_padding(name, tokenizer, monkeypatch):
    model = build(name, tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for task in model.tasks:
        longest = model.task_tokens(task)
        with model.for_task(task), torch.no_grad():
            short = model.encode_text(task)
        length = longest["input_ids"].shape[1] + 3  # leaves CoOp's context room in the 20 positions
        padded = tokenizer(
            model.tasks[task].prompts, padding="max_length", max_length=length, return_tensors="pt"
        )
        monkeypatch.setattr(model, "task_tokens", lambda task, padded=padded: dict(padded))
        with model.for_task(task), torch.no_grad():
            long = model.encode_text(task)
        monkeypatch.undo()
        assert_close_to_scale(short, long)


def test_prompts_change_the_features_and_coop_replaces_the_template(tokenizer):
    coop = build("coop", tokenizer).eval()
    assert coop.tasks["clipart"].prompts == ["cat.", "dog."]
    plain = build("zeroshot", tokenizer).eval()
    assert not torch.allclose(coop.text_features("art"), plain.text_features("art"))


def test_mmap_variants_build_the_table_3_structures(tokenizer):
    assert build("mmap", tokenizer).adapters_for("art") == ["group0", "art"]
    assert build("mmap_task_only", tokenizer).adapters_for("art") == ["art"]
    assert build("mmap_group_only", tokenizer).adapters_for("product") == ["group1"]
    assert build("mmap_one_group", tokenizer).groups == [["art", "clipart", "product"]]
    model = build("mmap_random_groups", tokenizer)
    assert isinstance(model, MultiTaskMmAP)
    assert model.groups == random_groups(["art", "clipart", "product"], 2, seed=0)
    assert sorted(t for g in model.groups for t in g) == ["art", "clipart", "product"]
    no_groups = build_method("mmap", make_clip(), tokenizer, TASKS)
    assert no_groups.groups == [["art", "clipart", "product"]]


def test_unknown_method_and_bad_depth(tokenizer):
    with pytest.raises(KeyError, match="known methods"):
        build_method("lora", make_clip(), tokenizer, TASKS)
    with pytest.raises(ValueError, match="depth must be"):
        build_method("vpt", make_clip(), tokenizer, TASKS, depth=4)


@pytest.mark.parametrize("name", ["coop", "maple_mt"])
def test_ctx_init_starts_the_context_at_the_phrase_word_embeddings(name, tokenizer):
    clip = make_clip()
    ids = tokenizer("ab cd", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    words = clip.text_model.embeddings.token_embedding.weight[ids].detach()
    options = {"n_ctx": len(ids)} if name == "coop" else {"prompt_length": 2}
    model = build_method(name, clip, tokenizer, TASKS, ctx_init="ab cd", **options)
    unit = next(iter(model.units.values()))
    if name == "coop":
        torch.testing.assert_close(unit.ctx.detach(), words)
    else:  # MaPLe: the first layer's text prompts are the first b words
        torch.testing.assert_close(unit.text[0].detach(), words[:2])
    assert METHODS[name].parameters(make_clip().config, len(TASKS), ctx_init="ab cd", **options) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_a_longer_ctx_init_fills_the_context_with_its_first_tokens(tokenizer):
    clip = make_clip()
    ids = tokenizer("ab cd", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    words = clip.text_model.embeddings.token_embedding.weight[ids].detach()
    model = build_method("coop", clip, tokenizer, TASKS, ctx_init="ab cd", n_ctx=3)
    torch.testing.assert_close(next(iter(model.units.values())).ctx.detach(), words[:3])


def test_every_trained_method_has_a_recipe_and_valid_trainer_settings():
    from peft_mmap.train import TrainConfig

    for name, spec in METHODS.items():
        config = TrainConfig(**spec.recipe.train)  # validates every field
        if name != "zeroshot":
            assert config.augment and spec.recipe.source, name


@pytest.mark.parametrize(("name", "options"), [("coop", {}), ("maple_mt", {"prompt_length": 2, "depth": 1})])
def test_a_context_from_the_template_words_starts_at_the_zero_shot_text_features(name, options, tokenizer):
    """The context takes CLIP's positions 1..n and the class tokens follow it, as in CoOp's and MaPLe's
    code; words of ``ctx_init`` past a MaPLe context stay in the prompt. Started from the zero-shot
    template's words, the class text features are the zero-shot ones."""
    phrase = "ab cd"
    words = tokenizer(phrase, add_special_tokens=False)["input_ids"]
    options = {"n_ctx": len(words), **options} if name == "coop" else options
    tasks = [TaskSpec(t.name, t.classnames, f"{phrase} {{}}.") for t in TASKS]
    zero_shot = build_method("zeroshot", make_clip(), tokenizer, tasks)
    model = build_method(name, make_clip(), tokenizer, TASKS, ctx_init=phrase, **options).eval()
    for task in tasks:
        assert_close_to_scale(model.text_features(task.name), zero_shot.text_features(task.name))
    context = len(words) if name == "coop" else 2
    assert (
        len(tokenizer(model.tasks["art"].prompts[0])["input_ids"])
        == len(tokenizer(tasks[0].prompts[0])["input_ids"]) - context
    )


def test_a_context_past_the_text_positions_is_refused(tokenizer):
    model = build_method("coop", make_clip(), tokenizer, TASKS, n_ctx=16)
    with pytest.raises(
        ValueError, match=r"16 context tokens \+ class prompts of up to \d+ tokens .* 20 positions"
    ):
        model.text_features("art")
