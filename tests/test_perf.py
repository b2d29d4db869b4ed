"""Fast paths behave exactly like the slow ones, and ``peft-mmap perf`` runs end to end (never timings)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import make_clip

from peft_mmap import MmAPConfig
from peft_mmap.classifier import TaskSpec
from peft_mmap.cli import add_perf_arguments
from peft_mmap.multitask import MultiTaskMmAP
from peft_mmap.perf import (
    GOALS,
    OFFICE_HOME_CLASSES,
    perf_clip_config,
    run_perf,
    saved_tensor_bytes,
    word_tokenizer,
)

TASKS = [
    TaskSpec("art", ["cat", "dog", "bird"]),
    TaskSpec("clipart", ["cat", "dog"], template="a clipart of a {}."),
    TaskSpec("product", ["cup", "key", "bell", "car"]),
]
GROUPS = [["art", "clipart"], ["product"]]


def make_mmap(tokenizer, attn_implementation: str = "sdpa") -> MultiTaskMmAP:
    model = MultiTaskMmAP(
        make_clip(attn_implementation=attn_implementation),
        tokenizer,
        TASKS,
        GROUPS,
        MmAPConfig(prompt_length=2, source_shape=(1, 8)),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model.eval()


def uncached_text_features(model: MultiTaskMmAP, task: str) -> torch.Tensor:
    model.activate(task)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(task), dim=-1)


def test_cached_text_features_equal_uncached_and_skip_the_module_walk(tokenizer, monkeypatch):
    model = make_mmap(tokenizer)
    for spec in TASKS:
        torch.testing.assert_close(model.text_features(spec.name), uncached_text_features(model, spec.name))
    walks = []
    original = type(model).parameters
    monkeypatch.setattr(
        type(model), "parameters", lambda self, *a, **k: walks.append(1) or original(self, *a, **k)
    )
    first = model.text_features("art")
    assert model.text_features("art") is first
    assert not walks  # nothing was registered since the last key: the parameter list is reused


def test_cache_is_invalidated_by_load_state_dict_of_frozen_weights(tokenizer):
    model = make_mmap(tokenizer)
    first = model.text_features("art")
    state = model.clip_model.text_model.state_dict()
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    model.clip_model.text_model.load_state_dict(state)  # frozen weights only, in place
    second = model.text_features("art")
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, uncached_text_features(model, "art"))


def test_cache_is_invalidated_by_an_optimizer_step_and_a_new_adapter(tokenizer):
    model = make_mmap(tokenizer)
    first = model.text_features("art")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    model(torch.randn(2, 3, 16, 16), "art").logsumexp(-1).sum().backward()
    optimizer.step()
    model.eval()
    stepped = model.text_features("art")
    assert not torch.allclose(first, stepped)
    torch.testing.assert_close(stepped, uncached_text_features(model, "art"))
    before = model._cache_key("art")
    model.peft_model.add_adapter("extra", MmAPConfig(prompt_length=2, source_shape=(1, 8)))
    after = model._cache_key("art")  # the registrations refreshed the parameter list
    assert after[1] > before[1] and after != before
    assert any(p is model.peft_model.base_model.mmap_source["extra"] for p in model._watched[1])


def test_mixed_batch_with_repeated_tasks_equals_per_task_batches_and_gradients(tokenizer):
    model = make_mmap(tokenizer).train()
    torch.manual_seed(3)
    pixels = torch.randn(6, 3, 16, 16)
    tasks = ["product", "art", "product", "clipart", "art", "art"]
    mixed = model(pixels, tasks)
    mixed.masked_fill(mixed.isinf(), 0).sum().backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0
    for i, task in enumerate(tasks):
        single = model(pixels[i : i + 1], task)
        torch.testing.assert_close(mixed[i, : single.shape[1]], single[0], atol=1e-5, rtol=1e-5)
        total = total + single.sum()
    total.backward()
    single_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed_grads.keys() == single_grads.keys()
    for name, grad in single_grads.items():
        torch.testing.assert_close(mixed_grads[name], grad, atol=1e-4, rtol=1e-4)


def test_routes_must_match_the_batch(tokenizer):
    model = make_mmap(tokenizer)
    with (
        pytest.raises(ValueError, match="routes name 2 samples but the batch has 3"),
        model.peft_model.base_model.adapter_routes([["group0", "art"], ["group1", "product"]]),
    ):
        model.clip_model.get_image_features(pixel_values=torch.randn(3, 3, 16, 16))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_mmap_text_features_do_not_depend_on_padding(tokenizer, attn_implementation):
    model = make_mmap(tokenizer, attn_implementation)
    for name, spec in model.tasks.items():
        longest = model.task_tokens(name)
        padded = tokenizer(spec.prompts, padding="max_length", max_length=20, return_tensors="pt")
        assert padded["input_ids"].shape[1] > longest["input_ids"].shape[1]
        model.activate(name)
        with torch.no_grad():
            short = model.clip_model.get_text_features(**longest).pooler_output
            long = model.clip_model.get_text_features(**padded).pooler_output
        torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_word_tokenizer_gives_one_token_per_word_and_clip_special_ids():
    config = perf_clip_config("tiny")
    prompts = [f"a photo of a {c}." for c in OFFICE_HOME_CLASSES]
    tokenizer = word_tokenizer(prompts, config)
    tokens = tokenizer(
        ["a photo of a paper clip.", "a photo of a mug."], padding="longest", return_tensors="pt"
    )
    sos, eos = config.text_config.bos_token_id, config.text_config.eos_token_id
    assert tokens["input_ids"].shape == (2, 9)  # SOS a photo of a paper clip . EOS
    assert tokens["input_ids"][:, 0].tolist() == [sos, sos]
    assert tokens["input_ids"][0, -1] == eos and tokens["input_ids"][1, 7] == eos
    assert tokens["attention_mask"].sum(1).tolist() == [9, 8]


def test_saved_tensor_bytes_counts_activations_but_not_parameters():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with saved_tensor_bytes(list(linear.parameters())) as saved:
        linear(x).relu().sum()
    assert saved[0] == 2 * 4 * 8 * 4  # the input of the linear and the output of the relu, fp32


def test_perf_command_writes_json_with_the_required_keys(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_perf_arguments(parser)
    options = "--arch tiny --batch 4 --steps 1 --warmup 0 --peak-tflops 1 --output"
    args = parser.parse_args([*options.split(), str(tmp_path)])
    run_perf(args)
    result = json.loads((tmp_path / "perf.json").read_text())
    assert {
        "arch",
        "device",
        "batch",
        "train_step_s",
        "peak_mem_mb",
        "infer_img_per_s",
        "text_step_s",
        "ratios",
    } <= set(result)
    methods = {"mmap", "vpt_deep", "coop", "maple", "full_ft"}
    assert set(result["train_step_s"]) == set(result["peak_mem_mb"]) == methods
    assert all(v > 0 for v in result["train_step_s"].values())
    assert set(result["infer_img_per_s"]) == {"zeroshot", "mmap_cached", "mmap_mixed"}
    assert {"dynamic", "pad77"} <= set(result["text_step_s"])
    assert set(result["ratios"]) == set(GOALS)
    assert all(isinstance(r["met"], bool) for r in result["ratios"].values())
    assert result["train_flops"]["mmap"] > 0 and result["mfu"]["mmap"] > 0
    assert "| `mmap` |" in (tmp_path / "perf.md").read_text()
    assert "| `mmap` |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--arch", "vit-h14"])
