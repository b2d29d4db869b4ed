"""Prompt slots: the sequence surgery that puts deep prompts into any CLIP encoder layer.

`forward_with_prompt_slots` runs one ``CLIPEncoderLayer`` with prompt *slots* spliced in after position 0
(CLS for vision, SOS for text), and `expand_attention_mask` gives the text mask the prompt positions. The
encoder layers of SigLIP, SigLIP 2 and MetaCLIP 2 are run the same way (`peft_mmap.families`); SigLIP's
towers have no CLS or SOS and pool the last text position or every patch (attention-pooling head), and
attend bidirectionally, so there the prompts' place in the sequence changes nothing but keeps the last
position last. It is
used by `peft_mmap.layer.MmAPLayer` (slots of MmAP adapters) and by `DeepPromptLayer`, which asks a
callback for the slots (the prompt baselines). At every layer:

* at layer 0 every slot's tokens are inserted after position 0,
* at a later layer a slot is replaced by new tokens, or flows through when its tokens are ``None`` (the
  slot's owner is past its depth),
* after the last layer all prompt tokens are removed, so pooling and every shape outside the encoder are
  CLIP's own.

A layer's outputs at the prompt positions are read only when the next layer lets a slot flow through: when
the next layer replaces every slot, or after the last layer, they are discarded. Such a layer computes only
the other rows (`forward_keeping_sequence_rows`): the prompts still give keys and values (computed once
per batch when every row has the same prompts), but their queries, attention output, out-projection and MLP
are skipped. With full-depth deep prompts that removes every prompt row from all of that work (MmAP on
ViT-B/16: 8 of 205 image rows, and 8 of 17 rows of each class prompt in the text tower). The re-stated
layer also computes CLIP's quick-GELU MLP with fewer element-wise passes (`clip_mlp`). Results are those of
the full computation up to floating-point rounding; `computing_prompt_rows` turns all of this off (the
reference in tests and benchmarks).

Inserted tokens get no positional embedding (they enter after the embedding layer, and after
``pre_layrnorm`` in the vision tower), as in MmAP, VPT-deep and MVLPT. For learnable prompts this loses no
generality: a fixed positional embedding added to a free vector is a reparametrisation of that vector.

With ``replace_rows`` (MmAP's ``text_placement="replace"``, the convention of CoOp's and MaPLe's context) the
slots are not inserted: they occupy rows ``1..T`` of the sequence, which hold ``T`` placeholder tokens after
SOS. Layer 0 replaces those rows (the caller adds CLIP's positional embeddings ``1..T`` first,
`positioned_slots`), later layers replace or keep them as above, and nothing is removed: the sequence keeps
its length, so the attention mask and the pooling are the model's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig
from transformers.activations import QuickGELUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPMLP, eager_attention_forward

from .families import ENCODER_LAYERS

Tower = Literal["text", "vision"]


#: One prompt slot at one layer: new tokens ``(n, d)``/``(1 or B, n, d)``, or ``None`` (keep the slot's
#: current tokens: its owner is past its depth), and the slot length ``n``.
PromptSlot = tuple[torch.Tensor | None, int]


def expand_attention_mask(
    mask: torch.Tensor | None, num_prompts: int, causal: bool = True
) -> torch.Tensor | None:
    """Insert ``num_prompts`` tokens after position 0 of an attention mask.

    ``causal`` (a CLIP text mask): the prompt tokens behave like tokens sitting between SOS and the first
    word: they attend to SOS and to earlier prompts; every later token attends to them. Not ``causal`` (a
    bidirectional key-padding mask: SigLIP's text tower, SigLIP 2's NaFlex patches): every query sees the
    prompts, and the prompts see every key that the first query sees (such a mask is the same for every query
    row). Prompts are never padding. Works for ``None``, 2-D ``(B, L)`` padding masks and 4-D ``(B, 1, Lq, L)``
    boolean or additive float masks (values for "allowed" and "blocked" are read from the mask itself, so
    dtype and convention are kept).

    Returns ``None`` or a mask of the same kind over ``L + num_prompts`` positions.
    """
    if mask is None or num_prompts == 0:
        return mask
    if mask.dim() == 2:  # (B, L) padding mask: prompts are real tokens.
        ones = torch.ones_like(mask[:, :1]).expand(-1, num_prompts)
        return torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    if mask.dim() != 4:
        raise ValueError(f"Unsupported attention mask of shape {tuple(mask.shape)}: expected 2-D or 4-D.")
    if not causal:
        return _expand_key_padding_mask(mask, num_prompts)
    # Columns: prompts are keys that every row after SOS may see, like token 1 in a causal mask.
    prompt_cols = mask[..., 1:2].expand(*mask.shape[:-1], num_prompts)
    mask = torch.cat([mask[..., :1], prompt_cols, mask[..., 1:]], dim=-1)
    if mask.shape[-2] == 1:  # (B, 1, 1, L) key-only mask: no rows to add.
        return mask
    # Rows: a prompt query sees SOS and the prompts up to itself, nothing after.
    sos_row = mask[..., :1, :]  # (B, 1, 1, L + T)
    allowed, blocked = sos_row[..., :1], sos_row[..., -1:]
    causal = torch.ones(num_prompts, num_prompts, dtype=torch.bool, device=mask.device).tril()
    prompt_block = torch.where(causal, allowed, blocked)  # (B, 1, T, T)
    prompt_rows = torch.cat(
        [
            sos_row[..., :1].expand(*sos_row.shape[:-2], num_prompts, 1),
            prompt_block,
            sos_row[..., 1 + num_prompts :].expand(*sos_row.shape[:-2], num_prompts, -1),
        ],
        dim=-1,
    )
    return torch.cat([mask[..., :1, :], prompt_rows, mask[..., 1:, :]], dim=-2)


def _expand_key_padding_mask(mask: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """A 4-D bidirectional mask ``(B, 1, Lq, L)`` with ``num_prompts`` allowed keys after position 0 and, when
    it has query rows, as many prompt query rows seeing what row 0 sees (and the prompts)."""
    if mask.dtype == torch.bool:
        allowed = torch.ones((), dtype=torch.bool, device=mask.device)
    else:  # additive: 0 where allowed
        allowed = torch.zeros((), dtype=mask.dtype, device=mask.device)
    prompt_cols = allowed.expand(*mask.shape[:-1], num_prompts)
    mask = torch.cat([mask[..., :1], prompt_cols, mask[..., 1:]], dim=-1)
    if mask.shape[-2] == 1:  # (B, 1, 1, L) key-only mask: no rows to add.
        return mask
    prompt_rows = mask[..., :1, :].expand(*mask.shape[:-2], num_prompts, -1)
    return torch.cat([mask[..., :1, :], prompt_rows, mask[..., 1:, :]], dim=-2)


#: Whether layers whose prompt outputs are discarded skip computing them (see the module docstring).
_SKIP_DISCARDED_ROWS = contextvars.ContextVar("peft_mmap_skip_discarded_rows", default=True)


@contextlib.contextmanager
def computing_prompt_rows() -> Iterator[None]:
    """Within the block, every layer runs its own forward over the whole sequence, computing its outputs at
    the prompt positions even where they are discarded: the plain computation (transformers' layer as it
    is) that `forward_keeping_sequence_rows` is tested and benchmarked against."""
    token = _SKIP_DISCARDED_ROWS.set(False)
    try:
        yield
    finally:
        _SKIP_DISCARDED_ROWS.reset(token)


def forward_with_prompt_slots(
    base_layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_index: int,
    num_layers: int,
    slots: list[PromptSlot],
    next_layer_replaces: bool = False,
    replace_rows: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Run one CLIP encoder layer with deep prompt slots spliced in after position 0.

    At layer 0 every slot's tokens are inserted after CLS/SOS; at a later layer each slot is replaced by
    its new tokens (or flows through when they are ``None``); after the last layer all prompt tokens are
    removed again. ``next_layer_replaces``: the next layer gives new tokens to every slot, so this layer's
    outputs at the prompt positions are never read; it returns the other rows only (and the next layer,
    whose slots all have tokens, expects exactly that). It is not read at the last layer.

    ``hidden_states``: ``(B, L, d)`` at layer 0 and after a layer that dropped the prompt rows, else
    ``(B, L + T, d)``, with ``T`` the total slot length. Returns ``(B, L, d)`` after the last layer or when
    ``next_layer_replaces``, else ``(B, L + T, d)``.

    ``replace_rows``: the slots take rows ``1..T`` of ``hidden_states`` (placeholders at layer 0, see the
    module docstring) instead of being inserted; then ``L`` counts those rows, the mask is used as it is, and
    the last layer returns all ``L`` rows (`check_placeholders` refuses a sequence too short for them).
    """
    if not slots:
        return base_layer(hidden_states, attention_mask, **kwargs)
    skip = _SKIP_DISCARDED_ROWS.get()
    batch = hidden_states.shape[0]
    total = sum(length for _, length in slots)
    rows = slice(1, 1 + total)
    if layer_index == 0:
        has_prompt_rows = replace_rows
        if replace_rows:
            check_placeholders(hidden_states, attention_mask, total)
    else:
        has_prompt_rows = not (skip and all(p is not None for p, _ in slots))
    pieces, offset = [], 1
    for prompts, length in slots:
        if prompts is None:
            if layer_index == 0:
                raise RuntimeError("A prompt slot has no tokens at the first layer.")
            prompts = hidden_states[:, offset : offset + length]
        pieces.append(prompts.to(hidden_states.dtype).reshape(-1, length, hidden_states.shape[-1]))
        offset += length
    prompts = _join_prompt_pieces(pieces, batch)
    sequence = _without_rows(hidden_states, rows) if has_prompt_rows else hidden_states
    mask = (
        attention_mask
        if replace_rows
        else expand_attention_mask(attention_mask, total, causal=bool(kwargs.get("is_causal")))
    )
    last = layer_index == num_layers - 1
    if (last and not replace_rows) or (not last and skip and next_layer_replaces):
        if skip and _can_skip_rows(base_layer, mask, kwargs):
            return forward_keeping_sequence_rows(base_layer, sequence, prompts, mask, **kwargs)
        return _without_rows(base_layer(_with_prompts(sequence, prompts), mask, **kwargs), rows)
    return base_layer(_with_prompts(sequence, prompts), mask, **kwargs)


def check_placeholders(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, total: int) -> None:
    """Refuse a text sequence whose rows ``1..total`` cannot be placeholders for ``total`` prompt tokens.

    ``hidden_states``: ``(B, L, d)``; ``attention_mask``: ``None`` or the text mask the layer gets (2-D
    ``(B, L)`` or 4-D ``(B, 1, Lq, L)``). Every row needs a real token after the placeholders (at least its
    EOS, which pooling reads): ``L >= total + 2``, and, where the mask marks padding, position ``total + 1``
    must not be padding. Which tokens sit at ``1..total`` is not checked: they are replaced whatever they are.
    """
    length = hidden_states.shape[1]
    short = length < total + 2
    if not short and attention_mask is not None:
        if attention_mask.dim() == 2:
            allowed = attention_mask[:, total + 1] == attention_mask[:, 0]
        else:  # the last query row sees every real key; the SOS row sees SOS, so [0, 0] reads "allowed"
            allowed = attention_mask[..., -1, total + 1] == attention_mask[..., 0, 0]
        short = not bool(allowed.all())
    if short:
        raise ValueError(
            f"text_placement='replace' puts {total} prompt tokens at positions 1..{total} of each text "
            f"sequence, replacing {total} placeholder tokens after SOS, but a sequence (length {length}, padding "
            f"included) has no real token after position {total}: tokenize each text with {total} placeholder "
            "tokens after SOS (as CoOp's 'X X X X {class}.' for 4 prompt tokens)."
        )


def positioned_slots(slots: list[PromptSlot], positions: torch.Tensor) -> list[PromptSlot]:
    """First-layer text slots as context *tokens*: each slot's prompts plus the positional embeddings of the
    positions it takes, ``1..T`` in slot order (CoOp, MaPLe). ``positions``: the text embeddings' position
    table ``(P, d)``; slots as `PromptSlot` (tokens ``(n, d)`` or ``(1 or B, n, d)``, none ``None``)."""
    offsets = itertools.accumulate([1] + [length for _, length in slots])
    return [
        (prompts + positions[offset : offset + length].to(prompts.dtype), length)
        for (prompts, length), offset in zip(slots, offsets, strict=False)
    ]


def _join_prompt_pieces(pieces: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The slots' tokens ``(1 or B, n_i, d)`` one after the other: ``(1, T, d)`` when every slot is the same for
    all rows, else ``(B, T, d)``."""
    if len(pieces) == 1:
        return pieces[0]
    if all(piece.shape[0] == 1 for piece in pieces):
        return torch.cat(pieces, dim=1)
    return torch.cat([piece.expand(batch, -1, -1) for piece in pieces], dim=1)


def _with_prompts(sequence: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``sequence`` ``(B, L, k)`` with ``prompts`` ``(1 or B, T, k)`` inserted after position 0: ``(B, L + T, k)``."""
    return torch.cat([sequence[:, :1], prompts.expand(sequence.shape[0], -1, -1), sequence[:, 1:]], dim=1)


def _without_rows(tensor: torch.Tensor, rows: slice, dim: int = 1) -> torch.Tensor:
    """``tensor`` without the positions ``rows`` along ``dim``."""
    before = tensor.narrow(dim, 0, rows.start)
    after = tensor.narrow(dim, rows.stop, tensor.shape[dim] - rows.stop)
    return torch.cat([before, after], dim=dim)


def _can_skip_rows(layer: nn.Module, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> bool:
    """Whether `forward_keeping_sequence_rows` computes exactly what ``layer(hidden, mask, **kwargs)`` does.

    It re-states transformers' ``CLIPEncoderLayer``/``CLIPAttention`` forward, which the encoder layers of every
    supported family share (`peft_mmap.families.ENCODER_LAYERS`: pre-norm attention with ``q/k/v/out_proj``,
    then a pre-norm MLP), so it is used only where those classes run their own forward (`_runs_own_forward`),
    without gradient checkpointing (which their own call applies), with eager or sdpa attention, a ``None`` or
    4-D mask, and no attention maps or hidden states being recorded (they would miss the skipped rows).
    """
    attn = getattr(layer, "self_attn", None)
    attention_cls = ENCODER_LAYERS.get(type(layer))
    return (
        attention_cls is not None
        and _runs_own_forward(layer, type(layer))
        and _runs_own_forward(attn, attention_cls)
        and not getattr(layer, "gradient_checkpointing", False)
        and attn.config._attn_implementation in ("eager", "sdpa")
        and (mask is None or mask.dim() == 4)
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
    )


def forward_keeping_sequence_rows(
    layer: nn.Module, sequence: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """``layer`` over ``sequence`` with ``prompts`` inserted after position 0, returning the sequence rows only.

    ``layer`` is a ``CLIPEncoderLayer`` (see `_can_skip_rows`); ``sequence``: ``(B, L, d)``; ``prompts``:
    ``(1 or B, T, d)``; ``mask``: ``None`` or ``(B, 1, L + T or 1, L + T)`` over the sequence with the prompts.
    The prompts give keys and values only (computed once for the batch when ``prompts`` has one row); the
    ``L`` sequence positions get queries, attention output, out-projection and MLP. The prompts' keys and
    values follow the sequence's (attention does not depend on the order of its keys; the mask's columns are
    reordered to match), so the gradients of the sequence's keys and values are views of one tensor, not
    zero-filled copies of the pieces around the prompts. Returns ``(B, L, d)``, what ``layer`` computes at
    those positions.
    """
    attn = layer.self_attn
    batch, length, _ = sequence.shape
    total = prompts.shape[1]
    normed, normed_prompts = layer.layer_norm1(sequence), layer.layer_norm1(prompts)

    def heads(states: torch.Tensor) -> torch.Tensor:  # (B, n, d) -> (B, heads, n, head_dim)
        return states.view(batch, states.shape[1], -1, attn.head_dim).transpose(1, 2)

    def sequence_then_prompts(projection: nn.Module) -> torch.Tensor:  # (B, heads, L + T, head_dim)
        return heads(torch.cat([projection(normed), projection(normed_prompts).expand(batch, -1, -1)], dim=1))

    queries = heads(attn.q_proj(normed))
    keys, values = sequence_then_prompts(attn.k_proj), sequence_then_prompts(attn.v_proj)
    if mask is None and kwargs.get("is_causal"):  # sdpa text tower without padding: make the mask explicit
        full = length + total
        causal = torch.ones(full, full, dtype=torch.bool, device=sequence.device).tril()
        mask = torch.zeros(full, full, dtype=queries.dtype, device=sequence.device)
        mask = mask.masked_fill(~causal, torch.finfo(queries.dtype).min)[None, None]
    kwargs = {**kwargs, "is_causal": False}
    if mask is not None:
        if mask.shape[-2] > 1:
            mask = _without_rows(mask, slice(1, 1 + total), dim=-2)
        mask = torch.cat([_without_rows(mask, slice(1, 1 + total), dim=-1), mask[..., 1 : 1 + total]], dim=-1)
    implementation = attn.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    dropout = attn.dropout if attn.training else 0.0
    attended, _ = interface(attn, queries, keys, values, mask, scaling=attn.scale, dropout=dropout, **kwargs)
    hidden = sequence + attn.out_proj(attended.reshape(batch, length, -1).contiguous())
    return hidden + clip_mlp(layer.mlp, layer.layer_norm2(hidden))


#: CLIP's ``quick_gelu(h) = h * sigmoid(1.702 h)``, the activation of every OpenAI CLIP checkpoint.
QUICK_GELU_SCALE = 1.702


def clip_mlp(mlp: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """``mlp(states)`` for a ``CLIPMLP``, with a quick-GELU activation computed as a scaled SiLU.

    ``quick_gelu(h) = silu(1.702 h) / 1.702``; the two scales go into the matrix products (``alpha``/``beta``
    of ``addmm``, free in the BLAS call), so over the ``(rows, intermediate)`` activation the forward pass
    makes one fused SiLU pass instead of three (``1.702 h``, sigmoid, product). When gradients are needed it
    runs as `QuickGELUMLPFunction`, whose backward pass makes one (the SiLU gradient: the two scales cancel)
    instead of five, and which keeps one such tensor for backward instead of two. Under autocast the inputs
    are cast to the autocast dtype first, as autocast casts ``fc1``/``fc2``'s. Equal to ``mlp(states)`` up
    to rounding. Any other MLP (another activation or class, wrapped linears, hooks) runs as ``mlp(states)``.

    ``states``: ``(B, L, d)``; returns ``(B, L, d)``.
    """
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (
        _runs_own_forward(mlp, CLIPMLP)
        and type(mlp.activation_fn) is QuickGELUActivation
        and all(_runs_own_forward(fc, nn.Linear) and fc.bias is not None for fc in (fc1, fc2))
    ):
        return mlp(states)
    inputs = (states.reshape(-1, states.shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    device = states.device.type
    with contextlib.ExitStack() as stack:
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            inputs = tuple(tensor.to(dtype) for tensor in inputs)
            stack.enter_context(torch.autocast(device, enabled=False))
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs):
            out = QuickGELUMLPFunction.apply(*inputs)
        else:
            out = _quick_gelu_mlp(*inputs)[1]
    return out.view(*states.shape[:-1], -1)


def _quick_gelu_mlp(
    rows: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1.702 fc1(rows), fc2(quick_gelu(fc1(rows))))``: rows ``(N, d)`` -> ``(N, I)`` and ``(N, d)``."""
    scale = QUICK_GELU_SCALE
    scaled = torch.addmm(b1, rows, w1.t(), beta=scale, alpha=scale)
    return scaled, torch.addmm(b2, F.silu(scaled), w2.t(), alpha=1 / scale)


class QuickGELUMLPFunction(torch.autograd.Function):
    """``fc2(quick_gelu(fc1(rows)))`` with a backward pass that leaves the ``1.702`` scales out.

    The gradient at the pre-activation is ``silu'(1.702 h) * (grad @ W2)``: the ``1 / 1.702`` of the output
    and the ``1.702`` inside the SiLU cancel, so no element-wise multiply is needed for them (autograd over
    the scaled ``addmm`` calls makes two). Saves ``1.702 h`` ``(N, I)`` for backward, and ``rows`` only where
    ``fc1``'s weight needs a gradient (``fc2``'s weight gradient recomputes the activation from ``1.702 h``).
    Differentiable once.
    """

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``(N, d)``; ``fc1``'s weight ``(I, d)``, bias ``(I,)``; ``fc2``'s ``(d, I)``, ``(d,)``.

        Returns ``(N, d)``.
        """
        scaled, out = _quick_gelu_mlp(rows, w1, b1, w2, b2)
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, w1, w2, scaled)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``grad`` ``(N, d)`` -> the gradients of ``forward``'s inputs (``None`` where none is needed)."""
        rows, w1, w2, scaled = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_rows = grad_w1 = grad_b1 = grad_w2 = None
        if needs[3]:
            grad_w2 = grad.t().mm(F.silu(scaled)).div_(QUICK_GELU_SCALE)
        if any(needs[:3]):
            grad_scaled = torch.ops.aten.silu_backward(grad.mm(w2), scaled)  # (N, I)
            grad_rows = grad_scaled.mm(w1) if needs[0] else None
            grad_w1 = grad_scaled.t().mm(rows) if needs[1] else None
            grad_b1 = grad_scaled.sum(0) if needs[2] else None
        return grad_rows, grad_w1, grad_b1, grad_w2, grad.sum(0) if needs[4] else None


def _runs_own_forward(module: nn.Module | None, cls: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``cls`` whose call runs ``cls.forward`` as it is: not overridden by a subclass or
    on the instance, no forward hooks."""
    return (
        isinstance(module, cls)
        and getattr(module.forward, "__func__", None) is cls.forward
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


#: ``slots(layer_index) -> [slot, ...]`` for one tower, in slot order; ``[]`` = no prompts at all.
SlotFn = Callable[[int], list[PromptSlot]]
#: ``replaces(layer_index) -> bool``: every slot of ``slots(layer_index)`` has new tokens (none flows through).
ReplacesFn = Callable[[int], bool]


class DeepPromptLayer(nn.Module):
    """Wraps one ``CLIPEncoderLayer`` and splices in the prompt slots returned by ``slots``.

    Args:
        base_layer: the wrapped ``CLIPEncoderLayer``.
        layer_index: its index in the encoder (0-based).
        num_layers: number of layers of the encoder.
        slots: callback giving the prompt slots of this layer (see `SlotFn`); it must give the same slot
            lengths at every layer of one forward pass.
        replaces: callback saying whether a layer replaces every slot (see `ReplacesFn`), without computing
            the prompts; it must agree with ``slots``.
    """

    def __init__(
        self, base_layer: nn.Module, layer_index: int, num_layers: int, slots: SlotFn, replaces: ReplacesFn
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.slots = slots
        self.replaces = replaces

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """See `forward_with_prompt_slots`."""
        slots, next_replaces = self.slots(self.layer_index), self.replaces(self.layer_index + 1)
        return forward_with_prompt_slots(
            self.base_layer,
            hidden_states,
            attention_mask,
            self.layer_index,
            self.num_layers,
            slots,
            next_replaces,
            **kwargs,
        )


def install_deep_prompts(encoder: nn.Module, slots: SlotFn, replaces: ReplacesFn) -> None:
    """Wrap every layer of a ``CLIPEncoder`` (``encoder.layers``) in a `DeepPromptLayer` calling ``slots``."""
    layers = encoder.layers
    for index, layer in enumerate(layers):
        if isinstance(layer, DeepPromptLayer):
            raise ValueError("This CLIP encoder already has deep prompts installed; use a fresh CLIPModel.")
        layers[index] = DeepPromptLayer(layer, index, len(layers), slots, replaces)


def tower_encoders(clip: nn.Module) -> dict[Tower, nn.Module]:
    """The ``CLIPEncoder`` of each tower of a ``CLIPModel``."""
    return {"text": clip.text_model.encoder, "vision": clip.vision_model.encoder}


def prompt_depth(
    depth: int | None,
    num_layers: int,
    default: int | None = None,
    label: str = "depth",
    scope: str = "of this model",
) -> int:
    """The number of prompted layers: ``depth``, else ``default`` clipped to ``num_layers``, else every layer.

    The one depth check of the package: ``depth`` must be an int in ``[1, num_layers]``; the error names
    ``label`` and says whose layers count (``scope``).
    """
    if depth is None:
        return num_layers if default is None else min(default, num_layers)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{label} must be an int in [1, {num_layers}] for this model, got {depth!r}.")
    if depth > num_layers:
        raise ValueError(
            f"{label}={depth} exceeds the {num_layers} layers {scope}; depth must be in [1, {num_layers}]."
        )
    return depth


def shared_depth(config: CLIPConfig, depth: int | None, default: int | None = None) -> int:
    """`prompt_depth` over the layers both towers of a ``CLIPModel`` config have (MmAP's default depth)."""
    layers = min(config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    return prompt_depth(depth, layers, default, scope="both towers have")
