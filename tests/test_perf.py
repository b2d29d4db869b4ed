"""Fast paths behave exactly like the slow ones, and ``peft-mmap perf`` runs end to end (never timings)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale, make_clip

from peft_mmap import MmAPConfig
from peft_mmap.apps.cli import add_perf_arguments
from peft_mmap.apps.perf import (
    OFFICE_HOME_CLASSES,
    SERVING,
    TRAIN_METHODS,
    ProfileSplit,
    flop_counter,
    interleaved_seconds,
    perf_clip_config,
    priced_ms,
    quartiles,
    ratio_spread,
    run_benchmark,
    run_perf,
    saved_tensor_bytes,
    word_tokenizer,
)
from peft_mmap.classifier import TaskSpec
from peft_mmap.multitask import MultiTaskMmAP

ROOT = Path(__file__).resolve().parents[1]

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
    with model.for_task(task), torch.no_grad():
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


def test_serving_with_task_switching_follows_training_like_a_fresh_model(tokenizer):
    model = make_mmap(tokenizer)
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 16, 16)

    def serve(classifier: MultiTaskMmAP) -> list[torch.Tensor]:
        """Batch-1 calls switching task every call, then one mixed-task batch (the serving patterns)."""
        with torch.inference_mode():
            calls = [classifier(pixels[i : i + 1], spec.name) for i, spec in enumerate(TASKS)]
            return [*calls, classifier(pixels, ["product", "art", "clipart"])]

    before = serve(model)  # fills the text cache and the constant prompts
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    sum(model(pixels, spec.name).logsumexp(-1).sum() for spec in TASKS).backward()
    optimizer.step()
    model.eval()
    fresh = make_mmap(tokenizer)
    fresh.load_state_dict(model.state_dict())
    after, expected = serve(model), serve(fresh)
    for got, want, old in zip(after, expected, before, strict=True):
        assert_close_to_scale(got, want)
        assert not torch.allclose(got, old, atol=1e-3)


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
        assert_close_to_scale(mixed[i, : single.shape[1]], single[0])
        total = total + single.sum()
    total.backward()
    single_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed_grads.keys() == single_grads.keys()
    for name, grad in single_grads.items():
        assert_close_to_scale(mixed_grads[name], grad)


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
        with model.for_task(name), torch.no_grad():
            short = model.clip_model.get_text_features(**longest).pooler_output
            long = model.clip_model.get_text_features(**padded).pooler_output
        assert_close_to_scale(short, long)


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


def test_word_tokenizer_on_siglip_shapes_adds_no_start_token_and_keeps_words_off_special_ids():
    config = perf_clip_config("siglip-b16-224")
    eos = config.text_config.eos_token_id
    assert config.text_config.bos_token_id is None and eos == 1  # SigLIP's "</s>" ends and pads
    tokenizer = word_tokenizer([f"this is a photo of {c}." for c in OFFICE_HOME_CLASSES], config)
    tokens = tokenizer(["this is a photo of mug."], padding="max_length", max_length=10, return_tensors="pt")
    ids = tokens["input_ids"][0].tolist()
    assert ids[7:] == [eos] * 3  # this is a photo of mug . </s> + padding
    assert eos not in ids[:7] and len(set(ids[:7])) == 7


def test_perf_on_another_family_refuses_the_clip_only_baselines():
    with pytest.raises(
        ValueError, match=r"Unknown perf methods \['coop'\] for --arch siglip-b16-224.*CoOp and MaPLe"
    ):
        run_benchmark("siglip-b16-224", methods=["mmap", "coop"])


def test_saved_tensor_bytes_counts_activations_but_not_parameters():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with saved_tensor_bytes(list(linear.parameters())) as saved:
        linear(x).relu().sum()
    assert saved[0] == 2 * 4 * 8 * 4  # the input of the linear and the output of the relu, fp32


def test_interleaved_seconds_runs_round_robin_with_a_rotating_start():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "ABC"}
    times = interleaved_seconds(calls, rounds=4, warmup=1, device=torch.device("cpu"))
    assert order == list("ABC" + "ABC" + "BCA" + "CAB" + "ABC")
    assert {k: len(v) for k, v in times.items()} == {"A": 4, "B": 4, "C": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_seconds_times_short_calls_in_blocks_of_a_fixed_count():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "ABC"}
    times = interleaved_seconds(calls, rounds=3, warmup=2, device=torch.device("cpu"), min_seconds=1e-3)
    assert order[:6] == list("ABCABC")  # two warm-up rounds of one call each
    blocks = [(name, len(list(run))) for name, run in itertools.groupby(order[6:])]
    assert [name for name, _ in blocks] == list("ABC" + "BCA" + "CAB")
    counts = {name: {n for b, n in blocks if b == name} for name in "ABC"}
    assert all(len(n) == 1 for n in counts.values())  # one block size per variant
    assert {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3, "C": 3}


def test_flop_counter_counts_fused_attention_on_cpu():
    batch, heads, queries, keys, dim = 2, 3, 5, 7, 4
    q = torch.randn(batch, heads, queries, dim, requires_grad=True)
    k, v = torch.randn(batch, heads, keys, dim), torch.randn(batch, heads, keys, dim)
    forward, backward = flop_counter(), flop_counter()
    with forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with backward:
        out.sum().backward()
    products = 2 * batch * heads * queries * keys * dim  # one (queries x dim) @ (dim x keys) product
    assert forward.get_total_flops() == 2 * products  # scores, then scores @ values
    assert backward.get_total_flops() == 5 * products  # torch's count: scores recomputed + 4 gradients


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_lets_a_step_reuse_memory_without_page_faults():
    # In a fresh process (the setting is process-wide): a 64 MiB block allocated and freed, six times.
    code = """if True:
        import sys, torch
        from peft_mmap.apps.perf import keep_freed_memory, minor_page_faults
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        faults = []
        for _ in range(6):
            before = minor_page_faults()
            torch.ones(2**24).sum()
            faults.append(minor_page_faults() - before)
        print(min(faults[3:]))  # once the heap has settled
    """
    faults = {}
    for mode in ("keep", "system"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        faults[mode] = int(done.stdout)
    pages = 2**26 // 4096
    assert faults["system"] >= pages // 2  # glibc maps the block anew: every page faults in again
    assert faults["keep"] < pages // 10  # the freed block is reused


def test_quartiles_and_ratio_spread():
    assert quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0}
    assert quartiles([2.0]) == {"median": 2.0, "q1": 2.0, "q3": 2.0}
    spread = ratio_spread([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])  # per-round ratios 2, 4, 3
    assert spread == {"value": 3.0, "q1": 2.5, "q3": 3.5, "of_medians": 4.0}
    with pytest.raises(ValueError):
        ratio_spread([1.0, 2.0], [1.0])


def _check_perf_json(result: dict, methods: set[str], batches: list[int]) -> None:
    """The keys `peft-mmap perf` promises, with consistent spreads and FLOP ratios."""
    assert set(result["train"]) == methods
    for entry in result["train"].values():
        q = entry["step_s"]
        assert 0 < q["q1"] <= q["median"] <= q["q3"] and len(entry["rounds_s"]) == result["rounds"]
        assert entry["gflop"] == pytest.approx(entry["gflop_forward"] + entry["gflop_backward"])
        assert entry["gflop_forward"] > 0 and entry["peak_mem_mb"] >= 0 and entry["mfu"] > 0
        assert 0 < entry["gflop_attention"] < entry["gflop"]
        if sys.platform == "linux":
            assert len(entry["page_faults"]) == result["rounds"] and min(entry["page_faults"]) >= 0
    # A frozen weight gets no gradient: full fine-tuning's backward costs more than its forward, VPT's less.
    train = result["train"]
    if {"full_ft", "vpt_deep"} <= methods:
        assert train["full_ft"]["gflop_backward"] > train["full_ft"]["gflop_forward"]
        assert train["vpt_deep"]["gflop_backward"] < train["vpt_deep"]["gflop_forward"]
    for other in methods - {"mmap"}:
        ratio = result["train_ratios"][f"mmap_over_{other}"]
        assert ratio["flops"] == pytest.approx(train["mmap"]["gflop"] / train[other]["gflop"])
        assert ratio["time_per_flop"]["value"] == pytest.approx(ratio["time"]["value"] / ratio["flops"])
    assert [entry["batch"] for entry in result["infer"].values()] == batches
    for entry in result["infer"].values():
        assert set(entry["img_per_s"]) == set(entry["gflop"]) == set(SERVING)
        floor = entry["ratios"]["mmap_over_zeroshot"]["flop_floor"]
        assert floor == pytest.approx(entry["gflop"]["zeroshot"] / entry["gflop"]["mmap"]) and floor < 1
    assert result["text"]["tokens_dynamic"] < 77
    for goal in result["goals"].values():
        assert isinstance(goal["met"], bool) and goal["q1"] <= goal["q3"]
    assert "infer_b1_mmap_over_zeroshot" in result["goals"]


def test_a_step_priced_at_its_own_rates_costs_what_it_took_and_more_work_costs_more():
    full = ProfileSplit(
        total_ms=1000, matmul_ms=900, attention_ms=100, optimizer_ms=40, gflop=180, gflop_attention=5
    )
    assert full.matmul_rate == pytest.approx(218.75) and full.attention_rate == pytest.approx(50)
    assert priced_ms(full, full)["total"] == pytest.approx(1000)
    # Half the other matrix products, the same attention and activations, no optimizer time of its own.
    lean = ProfileSplit(
        total_ms=620, matmul_ms=520, attention_ms=100, optimizer_ms=0, gflop=92.5, gflop_attention=5
    )
    price = priced_ms(lean, full)
    assert price["matmul"] == pytest.approx(400) and price["attention"] == pytest.approx(100)
    assert price["other"] == pytest.approx(60) and price["total"] == pytest.approx(560)


def test_perf_command_writes_json_and_markdown(tmp_path, capsys):
    from peft_mmap.apps.cli import main

    options = "perf --arch tiny --batch 2 --infer-batches 1,2 --rounds 2 --warmup 0 --peak-tflops 1"
    methods = ["--methods", "mmap,vpt_deep,full_ft"]
    # --system-malloc: the allocator setting would last for the rest of this test process.
    main([*options.split(), *methods, "--system-malloc", "--profile", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "perf.json").read_text())
    assert result["malloc"] == "the system's default"
    profile = (tmp_path / "profile.md").read_text()
    for section in (
        "zeroshot: 8 batch-1 calls",
        "mmap: 8 batch-1 calls",
        "mmap: one training step (batch 2)",
    ):
        assert f"## {section}" in profile
    full_ft = profile.split("## full_ft: one training step (batch 2)")[1]
    split = re.search(
        r"matrix products ([\d.]+) ms \(([\d.]+) %; attention kernels ([\d.]+) ms\), other [\d.]+ ms "
        r"\(([\d.]+) %\) \(optimizer step",
        full_ft,
    )
    assert split and abs(float(split[2]) + float(split[4]) - 100) < 0.2
    assert float(split[3]) <= float(split[1])
    priced = re.search(
        r"## mmap priced at full_ft's rates\n\n.* = ([\d.]+) ms; measured ([\d.]+) ms", profile
    )
    assert priced and float(priced[1]) > 0 and float(priced[2]) > 0
    _check_perf_json(result, {"mmap", "vpt_deep", "full_ft"}, [1, 2])
    report = (tmp_path / "perf.md").read_text()
    assert "| `mmap` |" in report and "| vpt_deep |" in report and "| 2 |" in report
    assert "| `mmap` |" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_perf_arguments(parser)
    for bad in (["--arch", "vit-h14"], ["--infer-batches", "1,0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError, match="--methods"):
        run_perf(parser.parse_args(["--methods", "mmap,nope"]))


@pytest.mark.slow
def test_gpu_script_runs_the_smoke_and_perf_unattended_on_cpu_with_the_tiny_model(tmp_path):
    env = dict(os.environ, DEVICE="cpu", ARCH="tiny", PRECISION="fp32", BATCH="2", INFER_BATCHES="1,2")
    env |= {"ROUNDS": "1", "WARMUP": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    env["PYTHON"] = sys.executable  # the suite's interpreter, whatever python3 is on PATH
    env["SMOKE_METHODS"] = (
        "zeroshot coop_mt mmap"  # the preset's MaPLe depth 12 exceeds the tiny CLIP's 2 layers
    )
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "perf.json").read_text())
    _check_perf_json(result, set(TRAIN_METHODS), [1, 2])
    assert result["peak_tflops"] == 989 and result["batch"] == 2
    assert result["malloc"].startswith("glibc keeping freed memory") == GLIBC
    assert "## mmap" in (tmp_path / "out" / "profile.md").read_text()
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert check["smoke"]["exit"] == 0 and check["perf"]["exit"] == 0 and check["limit_s"] == 480
    smoke = tmp_path / "out" / "smoke-officehome"
    methods = json.loads((smoke / "bench" / "results.json").read_text())["methods"]
    assert (
        set(methods) == {"zeroshot", "coop_mt", "mmap"}
        and methods["mmap"]["recipe"]["train"]["batch_size"] == 2
    )
    assert "Ours / paper, Table 1 (10%" in (smoke / "paper_comparison.md").read_text()


def test_perf_module_does_not_import_the_command_line():
    code = "import sys, peft_mmap.apps.perf; print('peft_mmap.apps.cli' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
