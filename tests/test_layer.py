"""MmAPLayer: Kronecker prompts per layer, sequence layout, masks, padding and batch behaviour."""

from __future__ import annotations

import pytest
import torch
from conftest import LAYERS, make_clip
from peft import get_peft_model

from peft_mmap import MmAPConfig, MmAPLayer
from peft_mmap.layer import expand_attention_mask


def _mmap(clip, names=("group0", "art"), **cfg):
    config = MmAPConfig(prompt_length=4, source_shape=(2, 8), **cfg)
    model = get_peft_model(clip, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.base_model.set_adapter(list(names))
    # Non-trivial scales so that every entry of kron(M, P) differs.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def _capture_layer_inputs(model):
    """Record the hidden states each wrapped CLIPEncoderLayer receives, keyed by (tower, index)."""
    seen = {}
    for module in model.modules():
        if isinstance(module, MmAPLayer):

            def hook(_mod, args, kwargs, key=(module.tower, module.layer_index)):
                seen[key] = (kwargs.get("hidden_states", args[0] if args else None), args, kwargs)

            module.base_layer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_prompts_are_kron_of_scale_and_source_at_every_layer(clip, batch):
    model = _mmap(clip)
    seen = _capture_layer_inputs(model)
    model(**batch)
    source = model.base_model.mmap_source
    layers = {(m.tower, m.layer_index): m for m in model.modules() if isinstance(m, MmAPLayer)}
    for (tower, k), (hidden, _, _) in seen.items():
        layer = layers[(tower, k)]
        expected = torch.cat(
            [torch.kron(layer.mmap_scale[name], source[name][k]) for name in ("group0", "art")]
        )
        torch.testing.assert_close(hidden[0, 1:9], expected)
        torch.testing.assert_close(hidden[1, 1:9], expected)


def test_sequence_lengths_per_layer_and_output_shapes(clip, batch):
    base = clip(**batch)
    model = _mmap(clip)
    seen = _capture_layer_inputs(model)
    out = model(**batch)
    for (tower, _k), (hidden, _, _) in seen.items():
        original = 5 if tower == "text" else 1 + 4
        assert hidden.shape[1] == original + 8
    assert out.text_model_output.last_hidden_state.shape == base.text_model_output.last_hidden_state.shape
    assert out.vision_model_output.last_hidden_state.shape == base.vision_model_output.last_hidden_state.shape
    assert out.logits_per_image.shape == (2, 2)


def test_depth_limits_new_prompts_and_later_layers_pass_them_through(clip, batch):
    model = _mmap(clip, names=("only",), depth=1)
    seen = _capture_layer_inputs(model)
    model(**batch)
    assert set(model.base_model.mmap_source["only"].shape) == {1, 2, 8}
    layers = [m for m in model.modules() if isinstance(m, MmAPLayer)]
    assert all(("only" in m.mmap_scale) == (m.layer_index == 0) for m in layers)
    # Layer 1 receives the prompt outputs of layer 0 (not fresh prompts): they differ from layer 0's input.
    assert not torch.allclose(seen[("vision", 1)][0][:, 1:5], seen[("vision", 0)][0][:, 1:5])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_features_do_not_depend_on_padding(attn):
    model = _mmap(make_clip(attn_implementation=attn))
    short = torch.tensor([[97, 5, 6, 98]])
    padded = torch.tensor([[97, 5, 6, 98, 0, 0, 0]])
    f_short = model.get_text_features(input_ids=short, attention_mask=torch.ones_like(short)).pooler_output
    f_pad = model.get_text_features(input_ids=padded, attention_mask=(padded != 0).long()).pooler_output
    torch.testing.assert_close(f_short, f_pad, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_with_and_without_padding(batch):
    outs = {}
    for attn in ("sdpa", "eager"):
        model = _mmap(make_clip(attn_implementation=attn))
        torch.manual_seed(0)
        outs[attn] = model(**batch).logits_per_image
        outs[attn + "-nopad"] = model.get_text_features(input_ids=batch["input_ids"][:1]).pooler_output
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa-nopad"], outs["eager-nopad"], atol=1e-5, rtol=1e-5)


def test_batch_rows_are_independent(clip, batch):
    model = _mmap(clip)
    full = model(**batch)
    for i in range(2):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        single = model(**row)
        torch.testing.assert_close(single.text_embeds[0], full.text_embeds[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.image_embeds[0], full.image_embeds[i], atol=1e-5, rtol=1e-5)


def test_prompts_change_both_towers(clip, batch):
    base = clip(**batch)
    out = _mmap(clip)(**batch)
    assert not torch.allclose(out.text_embeds, base.text_embeds)
    assert not torch.allclose(out.image_embeds, base.image_embeds)


def test_adapter_order_is_the_slot_order(clip, batch):
    # With depth 1 the prompts flow on through causal text layers, so their order shows in the features.
    model = _mmap(clip, depth=1)
    first = model(**batch).text_embeds
    model.base_model.set_adapter(["art", "group0"])
    assert not torch.allclose(first, model(**batch).text_embeds)


def test_expand_attention_mask_matches_a_causal_mask_built_from_scratch():
    length, prompts = 5, 3
    pad = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & pad[:, None, :])[:, None]  # (1, 1, L, L)
    expanded = expand_attention_mask(mask, prompts)
    full_pad = torch.cat([pad[:, :1], torch.ones(1, prompts, dtype=torch.bool), pad[:, 1:]], dim=1)
    full = (torch.ones(length + prompts, length + prompts, dtype=torch.bool).tril() & full_pad[:, None, :])[
        :, None
    ]
    assert torch.equal(expanded, full)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(
        expand_attention_mask(additive, prompts), torch.where(full, 0.0, torch.finfo(torch.float32).min)
    )
    assert torch.equal(expand_attention_mask(pad.long(), prompts), full_pad.long())
    assert expand_attention_mask(None, prompts) is None


def test_all_layers_are_wrapped(clip):
    model = _mmap(clip, names=("a",))
    assert sum(isinstance(m, MmAPLayer) for m in model.modules()) == 2 * LAYERS
