"""Prompt slots: a layer whose prompt outputs are discarded skips them, with the same results and fewer FLOPs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale, make_clip, mmap_with_random_prompts, projection_loss
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPMLP

from peft_mmap.apps.perf import saved_tensor_bytes
from peft_mmap.prompting import clip_mlp, computing_prompt_rows, expand_attention_mask


def _step(model, batch, **kwargs):
    """Logits, both embeddings and every trainable gradient of one forward + backward pass."""
    model.zero_grad()
    out = model(**batch, **kwargs)
    (projection_loss(out.logits_per_image) + projection_loss(out.text_embeds, seed=1)).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return [out.logits_per_image.detach(), out.text_embeds.detach(), out.image_embeds.detach(), *grads]


def _assert_all_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert_close_to_scale(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("depth", [None, 2, 1])
def test_skipping_discarded_prompt_rows_changes_no_output_or_gradient(attn, depth, batch):
    model = mmap_with_random_prompts(make_clip(attn_implementation=attn), depth=depth).train()
    skipped = _step(model, batch)
    with computing_prompt_rows():
        full = _step(model, batch)
    _assert_all_close(skipped, full)
    unpadded = {"input_ids": batch["input_ids"][:1]}  # sdpa: no mask, causality through is_causal
    features = model.get_text_features(**unpadded).pooler_output
    with computing_prompt_rows():
        assert_close_to_scale(features, model.get_text_features(**unpadded).pooler_output)


@pytest.mark.parametrize("depth", [None, 1])
def test_skipping_discarded_prompt_rows_saves_flops(depth, batch):
    model = mmap_with_random_prompts(make_clip(), depth=depth).eval()
    flops = {}
    for label, context in (("skipped", torch.no_grad), ("full", computing_prompt_rows)):
        counter = FlopCounterMode(display=False)
        with context(), torch.no_grad(), counter:
            model(**batch)
        flops[label] = counter.get_total_flops()
    # depth 1: only the last layer's prompt rows are discarded; full depth: every layer's.
    assert flops["skipped"] < flops["full"]


def test_prompts_shared_by_the_batch_give_their_keys_and_values_once(batch):
    model = mmap_with_random_prompts(make_clip()).eval()
    pixels = batch["pixel_values"][:1]
    flops = {}
    for size in (1, 4):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.get_image_features(pixel_values=pixels.expand(size, -1, -1, -1))
        flops[size] = counter.get_total_flops()
    # Per image, everything but the prompts' keys and values: four images cost less than four single ones.
    assert flops[4] < 4 * flops[1]


def test_mixed_task_routes_give_the_same_features_with_and_without_skipping(batch):
    model = mmap_with_random_prompts(make_clip(), names=("g", "a", "b")).eval()
    pixels = batch["pixel_values"]
    with torch.inference_mode(), model.base_model.adapter_routes([["g", "a"], ["g", "b"]]):
        skipped = model.get_image_features(pixel_values=pixels).pooler_output
        with computing_prompt_rows():
            full = model.get_image_features(pixel_values=pixels).pooler_output
    assert_close_to_scale(skipped, full)


def test_recorded_hidden_states_and_attentions_are_computed_in_full(batch):
    model = mmap_with_random_prompts(make_clip(attn_implementation="eager")).eval()
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        out = model(**batch, **kwargs)
        with computing_prompt_rows():
            full = model(**batch, **kwargs)
    for tower in ("text_model_output", "vision_model_output"):
        got, want = getattr(out, tower), getattr(full, tower)
        recorded, reference = got.hidden_states + got.attentions, want.hidden_states + want.attentions
        assert len(got.hidden_states) == len(want.hidden_states) and len(recorded) == len(reference)
        for a, b in zip(recorded, reference, strict=True):
            torch.testing.assert_close(a, b)


def test_gradient_checkpointing_keeps_its_memory_saving_and_the_results(batch, monkeypatch):
    model = mmap_with_random_prompts(make_clip(), depth=2).train()
    expected = _step(model, batch)
    clip = model.base_model.model
    clip.gradient_checkpointing_enable()
    layers = clip.vision_model.encoder.layers
    mlp_calls = []
    for layer in layers:  # counted in forward itself: checkpoint recomputation runs no module hooks
        mlp = layer.base_layer.mlp
        monkeypatch.setattr(mlp, "forward", lambda x, run=mlp.forward: mlp_calls.append(1) or run(x))
    _assert_all_close(_step(model, batch), expected)
    # Every layer ran through its own checkpointed call: its MLP ran again in the backward pass.
    assert len(mlp_calls) == 2 * len(layers)


def _clip_mlp(hidden_act: str = "quick_gelu") -> CLIPMLP:
    torch.manual_seed(0)
    return CLIPMLP(
        CLIPVisionConfig(hidden_size=16, intermediate_size=64, num_attention_heads=2, hidden_act=hidden_act)
    )


def _outputs_and_gradients(run, mlp: CLIPMLP, states: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    mlp.zero_grad()
    states = states.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(states)
    out.float().square().sum().backward()
    return [out.detach().float(), states.grad, *(p.grad for p in mlp.parameters())]


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_mlp_gives_the_mlps_outputs_and_gradients(hidden_act, autocast, trainable):
    mlp, states = _clip_mlp(hidden_act).requires_grad_(trainable), 3 * torch.randn(2, 5, 16)
    got = _outputs_and_gradients(lambda x: clip_mlp(mlp, x), mlp, states, autocast)
    want = _outputs_and_gradients(mlp, mlp, states, autocast)
    assert len(got) == 6 and got[0].shape == (2, 5, 16)
    assert all((grad is not None) == trainable for grad in got[2:])
    got, want = [t for t in got if t is not None], [t for t in want if t is not None]
    for a, b in zip(got, want, strict=True):  # bf16 keeps 8 bits of mantissa
        tolerance = 3e-2 if autocast else 1e-5
        torch.testing.assert_close(a, b, atol=tolerance * b.abs().max().item(), rtol=0)


def test_clip_mlp_runs_on_the_meta_device():
    mlp, states = _clip_mlp().to("meta"), torch.randn(2, 5, 16, device="meta", requires_grad=True)
    assert clip_mlp(mlp, states).shape == (2, 5, 16)


def test_clip_mlp_gives_gradients_once():
    mlp, states = _clip_mlp(), torch.randn(2, 5, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(clip_mlp(mlp, states).square().sum(), states, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def _saved_activation_bytes(run, mlp: CLIPMLP, states: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward while ``run(states)``."""
    with saved_tensor_bytes(list(mlp.parameters())) as saved:
        run(states.requires_grad_())
    return saved[0]


def test_clip_mlp_keeps_one_activation_for_backward_where_quick_gelu_keeps_two():
    mlp, states = _clip_mlp().requires_grad_(False), torch.randn(2, 5, 16)
    activation = 2 * 5 * 64 * 4  # one (rows, intermediate) float32 tensor
    assert _saved_activation_bytes(mlp, mlp, states) == 2 * activation
    assert _saved_activation_bytes(lambda x: clip_mlp(mlp, x), mlp, states) == activation


def test_clip_mlp_runs_a_hooked_or_replaced_mlp_as_it_is():
    mlp, states = _clip_mlp(), torch.randn(2, 5, 16)
    calls = []
    mlp.fc1.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0)
    torch.testing.assert_close(clip_mlp(mlp, states), mlp(states))
    assert len(calls) == 2
    mlp = _clip_mlp()
    mlp.forward = lambda x: x + 1
    torch.testing.assert_close(clip_mlp(mlp, states), states + 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_bidirectional_mask_gets_prompts_as_real_tokens_seen_by_every_query(attn):
    """A bidirectional key-padding mask (SigLIP's text tower, SigLIP 2's NaFlex patches) with prompts inserted
    after position 0 is transformers' own mask of the longer sequence in which the prompts are real tokens."""
    from transformers import SiglipTextConfig
    from transformers.masking_utils import create_bidirectional_mask

    config = SiglipTextConfig(hidden_size=8, num_attention_heads=2)
    config._attn_implementation = attn
    padding = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    prompts = 3

    def mask(padding: torch.Tensor) -> torch.Tensor:
        embeds = torch.zeros(*padding.shape, 8)
        return create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=padding)

    longer = torch.cat([padding[:, :1], torch.ones(2, prompts, dtype=torch.long), padding[:, 1:]], dim=1)
    assert torch.equal(expand_attention_mask(mask(padding), prompts, causal=False), mask(longer))
    assert torch.equal(expand_attention_mask(padding, prompts, causal=False), longer)
