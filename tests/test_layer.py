"""MmAPLayer: Kronecker prompts per layer, sequence layout, masks, padding and batch behaviour."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import LAYERS, assert_close_to_scale, make_clip, projection_loss, with_placeholders
from conftest import mmap_with_random_prompts as _mmap
from peft import get_peft_model

from peft_mmap import MmAPConfig, MmAPLayer
from peft_mmap.prompting import computing_prompt_rows, expand_attention_mask


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


@pytest.mark.parametrize("scale_init", ["vision_zeros", "ones"])
def test_scale_init_sets_where_each_towers_prompts_start(clip, scale_init):
    """'vision_zeros' (the default): text prompts tiled copies of P_s, vision prompts zero; 'ones': both tiled."""
    from peft import get_peft_model

    from peft_mmap import MmAPConfig

    config = MmAPConfig(prompt_length=4, source_shape=(2, 8), scale_init=scale_init)
    assert MmAPConfig().scale_init == "vision_zeros"
    model = get_peft_model(clip, config)
    source = model.base_model.mmap_source["default"]
    layers = [m for m in model.modules() if isinstance(m, MmAPLayer)]
    assert {m.tower for m in layers} == {"text", "vision"}
    for layer in layers:
        prompt = layer.layer_prompt("default")  # (b, d)
        tiled = torch.kron(torch.ones(2, layer.hidden_size // 8), source[layer.layer_index])
        if layer.tower == "vision" and scale_init == "vision_zeros":
            assert prompt.abs().sum() == 0 and prompt.shape == tiled.shape
        else:
            assert torch.equal(prompt, tiled), (layer.tower, layer.layer_index)


def test_vision_zeros_starts_a_vision_only_model_at_ones_so_p_s_learns_from_the_first_step(batch):
    from peft import get_peft_model
    from transformers import CLIPVisionModel

    from peft_mmap import MmAPConfig

    model = get_peft_model(CLIPVisionModel(make_clip().config.vision_config), MmAPConfig())
    projection_loss(model(pixel_values=batch["pixel_values"]).pooler_output).backward()
    source = model.base_model.mmap_source["default"]
    assert source.grad is not None and (source.grad.flatten(1).abs().sum(-1) > 0).all()
    for layer in (m for m in model.modules() if isinstance(m, MmAPLayer)):
        assert torch.equal(layer.mmap_scale["default"], torch.ones_like(layer.mmap_scale["default"]))


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
    assert_close_to_scale(f_short, f_pad)


def test_sdpa_equals_eager_with_and_without_padding(batch):
    outs = {}
    for attn in ("sdpa", "eager"):
        model = _mmap(make_clip(attn_implementation=attn))
        torch.manual_seed(0)
        outs[attn] = model(**batch).logits_per_image
        outs[attn + "-nopad"] = model.get_text_features(input_ids=batch["input_ids"][:1]).pooler_output
    assert_close_to_scale(outs["sdpa"], outs["eager"])
    assert_close_to_scale(outs["sdpa-nopad"], outs["eager-nopad"])


def test_batch_rows_are_independent(clip, batch):
    model = _mmap(clip)
    full = model(**batch)
    for i in range(2):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        single = model(**row)
        assert_close_to_scale(single.text_embeds[0], full.text_embeds[i])
        assert_close_to_scale(single.image_embeds[0], full.image_embeds[i])


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


def _reference_image_embeds(model, pixels, names, depth):
    """Image features computed by hand from CLIP's own modules: ``kron(M^k, P_s^k)`` spliced in after CLS at
    each of the first ``depth`` layers; above them the last prompts flow through as ordinary tokens."""
    clip, source = model.base_model.model, model.base_model.mmap_source
    vision = clip.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixels))
    layers = vision.encoder.layers
    for k, layer in enumerate(layers):
        if k < depth:
            prompts = torch.cat([torch.kron(layer.mmap_scale[name], source[name][k]) for name in names])
            rest = hidden[:, 1:] if k == 0 else hidden[:, 1 + len(prompts) :]
            hidden = torch.cat([hidden[:, :1], prompts.expand(len(pixels), -1, -1), rest], dim=1)
        hidden = layer.base_layer(hidden, None)
    features = clip.visual_projection(vision.post_layernorm(hidden[:, 0]))
    return torch.nn.functional.normalize(features, dim=-1)  # CLIPModel's image_embeds are normalised


def _outputs(model, batch, mode):
    """Text and image embeddings and logits, with autograd on (``"grad"``) or off (``"no_grad"``, ``"inference"``)."""
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        out = model(**batch)
    return [t.detach().clone() for t in (out.text_embeds, out.image_embeds, out.logits_per_image)]


@pytest.mark.parametrize("depth", [None, 1])
def test_outputs_without_autograd_equal_outputs_with_it_and_a_hand_made_reference(clip, batch, depth):
    model = _mmap(clip, depth=depth).eval()
    expected = _outputs(model, batch, "grad")
    for mode in ("no_grad", "inference", "inference", "no_grad"):  # repeated calls reuse constant prompts
        for got, want in zip(_outputs(model, batch, mode), expected, strict=True):
            assert_close_to_scale(got, want)
    with torch.no_grad():
        reference = _reference_image_embeds(model, batch["pixel_values"], ("group0", "art"), depth or LAYERS)
    assert_close_to_scale(expected[1], reference)


def test_routed_outputs_without_autograd_equal_per_adapter_outputs(clip, batch):
    model = _mmap(clip, names=("g", "a", "b")).eval()
    pixels = batch["pixel_values"]
    per_task = []
    for i, task in enumerate(("a", "b")):
        model.base_model.set_adapter(["g", task])
        per_task.append(model.get_image_features(pixel_values=pixels[i : i + 1]).pooler_output.detach())
    for _ in range(2):
        with torch.inference_mode(), model.base_model.adapter_routes([["g", "a"], ["g", "b"]]):
            mixed = model.get_image_features(pixel_values=pixels).pooler_output
        assert_close_to_scale(mixed, torch.cat(per_task))


def _fresh_copy(model):
    """A newly built model (same base CLIP, same adapters) holding ``model``'s current weights."""
    fresh = _mmap(make_clip(), names=tuple(model.peft_config)).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def _assert_serves_like_a_fresh_model(model, batch, previous=None):
    """Outputs without autograd equal a fresh model's and, given ``previous`` outputs, moved away from them."""
    got = _outputs(model, batch, "inference")
    for tensor, want in zip(got, _outputs(_fresh_copy(model), batch, "grad"), strict=True):
        assert_close_to_scale(tensor, want)
    if previous is not None:  # the update matters, so stale prompts could not pass the check above
        assert all((a - b).abs().max() > 1e-2 for a, b in zip(got[:2], previous[:2], strict=True))
    return got


def test_outputs_without_autograd_follow_every_kind_of_parameter_update(clip, batch):
    model = _mmap(clip).eval()
    outputs = _assert_serves_like_a_fresh_model(model, batch)  # also fills the constant prompts
    trainable = [p for p in model.parameters() if p.requires_grad]
    # An optimizer step (in place).
    optimizer = torch.optim.SGD(trainable, lr=20.0)
    model(**batch).logits_per_image.logsumexp(-1).sum().backward()
    optimizer.step()
    outputs = _assert_serves_like_a_fresh_model(model, batch, outputs)
    # load_state_dict of the adapter weights (in-place copies).
    state = {k: 3 * v + 1 for k, v in model.state_dict().items() if "mmap_" in k}
    model.load_state_dict(state, strict=False)
    outputs = _assert_serves_like_a_fresh_model(model, batch, outputs)
    # New storage behind the same parameter objects (same version counters), as Module.to(...) does.
    with torch.no_grad():
        for p in trainable:
            p.data = p.data + 1.0
    outputs = _assert_serves_like_a_fresh_model(model, batch, outputs)
    # Frozen adapters under grad mode are constants too, and follow updates as well.
    for p in trainable:
        p.requires_grad_(False)
    _outputs(model, batch, "grad")
    with torch.no_grad():
        for p in trainable:
            p.add_(0.5)
    got = _outputs(model, batch, "grad")
    for tensor, want in zip(got, _outputs(_fresh_copy(model), batch, "no_grad"), strict=True):
        assert_close_to_scale(tensor, want)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(got[:2], outputs[:2], strict=True))


def test_outputs_without_autograd_follow_a_recreated_adapter(clip, batch):
    model = _mmap(clip).eval()
    before = _outputs(model, batch, "inference")
    config = model.peft_config["art"]
    model.base_model.delete_adapter("art")
    model.add_adapter("art", config)
    model.base_model.set_adapter(["group0", "art"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".art"):
                p.normal_(std=3.0)
    _assert_serves_like_a_fresh_model(model, batch, before)


# ---- text_placement="replace": the prompts take rows 1..T of the text sequence -----------------------------


def _prompts_written_by_hand(model, inputs, depths, attn="sdpa"):
    """Text features of an untouched copy of the base CLIP whose own encoder layers get rows ``1..T`` of their
    input overwritten (forward pre-hooks): at layer ``k`` each adapter of ``depths`` (``{name: depth}``, in
    slot order, ``b = 4`` each) with ``k < depth`` writes ``kron(M^k, P_s^k)`` over its 4 rows, plus CLIP's
    position embeddings of those rows at layer 0; past its depth its rows are left alone. MaPLe's text
    prompts, by hand."""
    reference = make_clip(attn_implementation=attn)
    source = model.base_model.mmap_source
    wrapped = {m.layer_index: m for m in model.modules() if isinstance(m, MmAPLayer) and m.tower == "text"}
    table = reference.text_model.embeddings.position_embedding.weight
    for k, layer in enumerate(reference.text_model.encoder.layers):

        def overwrite(_module, args, kwargs, k=k):
            hidden = args[0].clone()
            for slot, (name, depth) in enumerate(depths.items()):
                rows = slice(1 + 4 * slot, 5 + 4 * slot)
                if k < depth:
                    prompts = torch.kron(wrapped[k].mmap_scale[name], source[name][k])
                    hidden[:, rows] = prompts + (table[rows] if k == 0 else 0)
            return (hidden, *args[1:]), kwargs

        layer.register_forward_pre_hook(overwrite, with_kwargs=True)
    with torch.no_grad():
        return reference.get_text_features(**inputs).pooler_output


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("depth", [None, 1, 2])
def test_replace_equals_prompts_written_over_rows_1_to_t_by_hand(batch, attn, depth):
    model = _mmap(make_clip(attn_implementation=attn), depth=depth, text_placement="replace")
    text = {k: v for k, v in with_placeholders(batch, 8).items() if k != "pixel_values"}  # one row padded
    want = _prompts_written_by_hand(model, text, {"group0": depth or LAYERS, "art": depth or LAYERS}, attn)
    for context in (contextlib.nullcontext, computing_prompt_rows):  # skipping discarded rows, and not
        with context(), torch.no_grad():
            assert_close_to_scale(model.get_text_features(**text).pooler_output, want)
    inserted = _mmap(make_clip(attn_implementation=attn), depth=depth)  # same parameters, inserted
    with torch.no_grad():
        assert not torch.allclose(inserted.get_text_features(**text).pooler_output, want, atol=1e-2)


def test_replace_with_a_depth_per_adapter_lets_each_adapters_rows_flow_past_its_depth(clip, batch):
    model = get_peft_model(
        clip, MmAPConfig(prompt_length=4, source_shape=(2, 8), text_placement="replace"), "g"
    )
    model.add_adapter(
        "t", MmAPConfig(prompt_length=4, source_shape=(2, 8), depth=1, text_placement="replace")
    )
    model.base_model.set_adapter(["g", "t"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mmap_" in name:
                p.normal_()
    text = {k: v for k, v in with_placeholders(batch, 8).items() if k != "pixel_values"}
    want = _prompts_written_by_hand(model, text, {"g": LAYERS, "t": 1})
    with torch.no_grad():
        assert_close_to_scale(model.get_text_features(**text).pooler_output, want)
        assert not torch.allclose(_prompts_written_by_hand(model, text, {"g": 1, "t": 1}), want, atol=1e-2)


def test_replace_keeps_the_text_sequence_and_inserts_vision_prompts_as_before(batch):
    inputs = with_placeholders(batch, 8)
    base = make_clip()(**inputs)
    model = _mmap(make_clip(), text_placement="replace")
    seen = _capture_layer_inputs(model)
    out = model(**inputs)
    for (tower, _k), (hidden, _, _) in seen.items():
        assert hidden.shape[1] == (13 if tower == "text" else 1 + 8 + 4)
    assert out.text_model_output.last_hidden_state.shape == base.text_model_output.last_hidden_state.shape
    inserted = _mmap(make_clip())  # the same parameters (same seed and draws), prompts inserted
    assert torch.equal(model.base_model.mmap_source["art"], inserted.base_model.mmap_source["art"])
    assert_close_to_scale(out.image_embeds, inserted(**inputs).image_embeds)


def test_replace_with_the_template_words_as_first_layer_prompts_gives_zero_shot_text_features():
    """Issue 29: depth 1, ``P_s = 1`` (1×1) and ``M_l`` = the token embeddings of "a photo of a": the first
    layer's text prompts are those words at CLIP's positions 1..4, so the text features are zero-shot CLIP's
    for "a photo of a {}." (dropping their position embeddings, or inserting them, moves the features far)."""
    from transformers import CLIPTokenizer

    from peft_mmap.base_models import TINY_CLIP_NAME, load_clip_model, load_pretrained

    tokenizer = load_pretrained(CLIPTokenizer, TINY_CLIP_NAME)
    classes = ["cat", "dog", "sailing boat", "alarm clock"]
    clip = load_clip_model(TINY_CLIP_NAME)
    zero_shot = tokenizer([f"a photo of a {c}." for c in classes], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = clip.get_text_features(**zero_shot).pooler_output
    words = tokenizer("a photo of a", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    config = MmAPConfig(prompt_length=len(words), source_shape=(1, 1), depth=1, text_placement="replace")
    model = get_peft_model(clip, config)
    with torch.no_grad():
        model.base_model.mmap_source["default"].fill_(1.0)
        text_layer = next(m for m in model.modules() if isinstance(m, MmAPLayer) and m.tower == "text")
        text_layer.mmap_scale["default"].copy_(clip.text_model.embeddings.token_embedding(words))
        placeholders = " ".join(["x"] * len(words))
        inputs = tokenizer([f"{placeholders} {c}." for c in classes], padding=True, return_tensors="pt")
        assert inputs["input_ids"].shape[1] == zero_shot["input_ids"].shape[1]
        assert_close_to_scale(model.get_text_features(**inputs).pooler_output, want)


def test_replace_refuses_text_without_room_for_the_placeholders(batch):
    model = _mmap(make_clip(), text_placement="replace")  # T = 8
    with pytest.raises(ValueError, match=r"puts 8 prompt tokens at positions 1\.\.8 .*\(length 5"):
        model.get_text_features(input_ids=batch["input_ids"][:1])  # no padding: too short
    for attn in ("sdpa", "eager"):
        model = _mmap(make_clip(attn_implementation=attn), text_placement="replace")
        fits = torch.tensor([[97, *[50] * 8, 5, 98], [97, *[50] * 8, 98, 0]])
        model.get_text_features(input_ids=fits, attention_mask=(fits != 0).long())  # every EOS after the 8
        short = torch.tensor([[97, *[50] * 8, 5, 98], [97, *[50] * 6, 98, 0, 0, 0]])  # row 2: EOS at 7
        with pytest.raises(ValueError, match=r"no real token after position 8"):
            model.get_text_features(input_ids=short, attention_mask=(short != 0).long())


def test_adapters_of_one_call_must_share_the_text_placement(clip, batch):
    model = get_peft_model(clip, MmAPConfig(prompt_length=4, source_shape=(2, 8)), adapter_name="a")
    model.add_adapter("b", MmAPConfig(prompt_length=4, source_shape=(2, 8), text_placement="replace"))
    model.base_model.set_adapter(["a", "b"])
    with pytest.raises(
        ValueError, match=r"Adapters \['a', 'b'\] mix text placements \['insert', 'replace'\]"
    ):
        model.get_text_features(
            **{k: v for k, v in with_placeholders(batch, 8).items() if k != "pixel_values"}
        )
    model.get_image_features(pixel_values=batch["pixel_values"])  # the vision tower inserts either way
