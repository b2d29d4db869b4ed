"""A tiny CLIP shipped with the package, pretrained by us on the synthetic benchmark.

The shipped files in :data:`TINY_CLIP_PATH` are a transformers ``CLIPModel`` (``config.json`` +
``model.safetensors``), a CLIP byte-level BPE tokenizer trained on the caption corpus (``vocab.json``,
``merges.txt``, ``tokenizer.json``) and a ``CLIPImageProcessor`` config, all loadable offline.

:func:`pretrain_tiny_clip` reproduces them: it renders image–caption pairs with
:mod:`peft_mmap.apps.synthetic` (in memory), trains the tokenizer, builds the model from a ``CLIPConfig`` and
trains it with CLIP's symmetric InfoNCE loss and learnable temperature. The corpus is deliberately uneven
across domains (a mix unlike the benchmark's four equal tasks) and it uses three of the benchmark's
labels loosely (:data:`AMBIGUOUS_LABELS`), so the benchmark is a shifted slice of the pretraining world:
zero-shot transfer differs by domain and a few labelled shots have something to teach. The run is
deterministic on CPU: fixed seeds, a fixed thread count and ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from peft_mmap.apps.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DOMAINS, render_image
from peft_mmap.base_models import TINY_CLIP_PATH, load_clip_model
from peft_mmap.classifier import load_clip_processor
from peft_mmap.files import atomic_write, atomic_write_json, atomic_write_text

__all__ = [
    "AMBIGUOUS_LABELS",
    "TINY_CLIP_PATH",
    "UNNAMED_CAPTIONS",
    "UNNAMED_SHARE",
    "caption_corpus",
    "caption_name",
    "clip_image_processor",
    "home_domain",
    "load_tiny_clip",
    "pretrain_tiny_clip",
]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_TEXT_LEN = 32
_TOKENIZER_CAPTIONS = 16000
#: The shipped model's input size (6 x 6 patches of 8 px + CLS = 37 image tokens per layer).
DEFAULT_IMAGE_SIZE = 48
_RENDER_SIZE = 64  # the synthetic benchmark's image size; the processor resizes to the model's
# Share of each domain in the pretraining corpus (Photo, Clipart, Sketch, Painting).
_DOMAIN_WEIGHTS = {"Photo": 0.35, "Clipart": 0.28, "Sketch": 0.22, "Painting": 0.15}
_DOMAIN_TEMPLATES = {
    "Photo": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a close-up photo of a {}.",
        "a blurry photo of a {}.",
        "a bright photo of the {}.",
    ),
    "Clipart": ("a {} in clipart style", "clipart of a {}.", "a cartoon {}.", "an icon of a {}."),
    "Sketch": (
        "a sketch of a {}.",
        "a drawing of the {}.",
        "a pencil sketch of a {}.",
        "a line drawing of a {}.",
    ),
    "Painting": (
        "a painting of a {}.",
        "an oil painting of the {}.",
        "a painting of a {} on canvas",
        "art of a {}.",
    ),
}
_GENERIC_TEMPLATES = (
    "a picture of a {}.",
    "a {}.",
    "a picture of a small red {}",
    "a big {}.",
    "the {} in the middle",
    "an image of a {}.",
)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
#: Benchmark labels the pretraining world uses loosely, as the web uses "mouse" or "crane":
#: ``{label: (synonym, other object)}``. Captions of the labelled object mostly use the synonym (the label
#: in `LABEL_SHARE` of them), and captions of the other object often use the label instead of its own name
#: (`LOOSE_SHARE`). Zero-shot CLIP then reads the label as mostly the other object; few shots can fix it.
AMBIGUOUS_LABELS: dict[str, tuple[str, str]] = {
    "diamond": ("gem", "kite"),
    "ring": ("donut", "circle"),
    "cup": ("mug", "bell"),
}
LABEL_SHARE = 0.25
LOOSE_SHARE = 0.5
_LOOSE_NAMES = {other: label for label, (_, other) in AMBIGUOUS_LABELS.items()}


def load_tiny_clip(path: str | os.PathLike = TINY_CLIP_PATH) -> tuple[CLIPModel, CLIPProcessor]:
    """Load the shipped tiny CLIP (or one saved by :func:`pretrain_tiny_clip`) in eval mode, offline; adapters on
    the shipped one record it as ``peft_mmap:tiny-clip`` (`peft_mmap.base_models.TINY_CLIP_NAME`)."""
    model = load_clip_model(path, local_files_only=True)
    processor = load_clip_processor(path, local_files_only=True)
    return model.eval(), processor


def caption_name(class_name: str, draw: float) -> str:
    """The word a pretraining caption uses for ``class_name``, given a uniform ``draw`` in [0, 1).

    See :data:`AMBIGUOUS_LABELS`; every other object is called by its benchmark label.
    """
    if class_name in AMBIGUOUS_LABELS and draw >= LABEL_SHARE:
        return AMBIGUOUS_LABELS[class_name][0]
    if class_name in _LOOSE_NAMES and draw < LOOSE_SHARE:
        return _LOOSE_NAMES[class_name]
    return class_name.replace("_", " ")


#: Style-only captions, which describe an image's style without naming its object (the "unnamed styles"
#: pilot world, ``pretrain_tiny_clip(unnamed_captions=True)``; not the shipped model).
UNNAMED_CAPTIONS: dict[str, tuple[str, ...]] = {
    "Photo": ("a photo.",),
    "Clipart": ("clipart.", "a cartoon icon.", "an icon in clipart style"),
    "Sketch": ("a sketch.", "a pencil drawing.", "a rough sketch on paper", "line art."),
    "Painting": ("a painting.", "an oil painting on canvas", "some art."),
}
#: Share of each domain's captions replaced by a style-only caption in that pilot world.
UNNAMED_SHARE: dict[str, float] = {"Photo": 0.0, "Clipart": 0.4, "Sketch": 0.6, "Painting": 0.5}


def home_domain(class_name: str) -> str:
    """The style an object is mostly drawn in when the world ties objects to styles (see `caption_corpus`)."""
    return SYNTHETIC_DOMAINS[SYNTHETIC_CLASSES.index(class_name) % len(SYNTHETIC_DOMAINS)]


def caption_corpus(
    seed: int, count: int, unnamed_captions: bool = False, home_domain_share: float | None = None
) -> tuple[list[str], list[str], list[str], list[bool]]:
    """``count`` (domain, class, caption, named) tuples drawn with the uneven domain mix, as four lists.

    Captions name each object with :func:`caption_name`. With ``unnamed_captions``, a share of each domain's
    captions (:data:`UNNAMED_SHARE`) is replaced by a style-only caption (:data:`UNNAMED_CAPTIONS`), drawn
    from a separate random stream, and marked ``named=False``. With ``home_domain_share``, that share of
    each object's pairs is redrawn in the object's :func:`home_domain` (a separate random stream; the rest
    keep the uneven mix), as on the web some objects are mostly photographed and others mostly drawn.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    names = list(_DOMAIN_WEIGHTS)
    domains = rng.choice(names, size=count, p=list(_DOMAIN_WEIGHTS.values()))
    classes = rng.choice(SYNTHETIC_CLASSES, size=count)
    if home_domain_share is not None:
        home_rng = np.random.default_rng(np.random.SeedSequence([seed, 78]))
        for i, class_name in enumerate(classes):
            if home_rng.random() < home_domain_share:
                domains[i] = home_domain(str(class_name))
    templates = []
    for domain in domains:
        pool = _DOMAIN_TEMPLATES[domain] if rng.random() < 0.7 else _GENERIC_TEMPLATES
        templates.append(pool[int(rng.integers(len(pool)))])
    captions = [
        t.format(caption_name(str(c), d))
        for t, c, d in zip(templates, classes, rng.random(count), strict=True)
    ]
    named = [True] * count
    if unnamed_captions:
        style_rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
        for i, domain in enumerate(domains):
            if style_rng.random() < UNNAMED_SHARE[domain]:
                pool = UNNAMED_CAPTIONS[domain]
                captions[i], named[i] = pool[int(style_rng.integers(len(pool)))], False
    return [str(d) for d in domains], [str(c) for c in classes], captions, named


def _render_batch(
    domains: Sequence[str], classes: Sequence[str], seed: int, stream: int, processor: CLIPImageProcessorPil
) -> torch.Tensor:
    """Render one image per (domain, class) and preprocess it: float pixel values ``(N, 3, S, S)``."""
    images = [
        render_image(
            class_name, domain, np.random.default_rng(np.random.SeedSequence([seed, stream, i])), _RENDER_SIZE
        )
        for i, (domain, class_name) in enumerate(zip(domains, classes, strict=True))
    ]
    chunks = [images[i : i + 512] for i in range(0, len(images), 512)]
    return torch.cat([processor(images=chunk, return_tensors="pt")["pixel_values"] for chunk in chunks])


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's image processor (PIL backend) at ``image_size``: bicubic resize of the shortest edge, centre crop,
    CLIP's mean and std (OpenAI's settings at 224)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _train_tokenizer(captions: Sequence[str], vocab_size: int) -> CLIPTokenizer:
    """Train a CLIP-style byte-level BPE (``</w>`` word suffix) on ``captions`` and wrap it in ``CLIPTokenizer``.

    The vocabulary is laid out like OpenAI's: 256 byte symbols, their 256 ``</w>`` forms, one token per
    merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    reference = CLIPTokenizer().backend_tokenizer  # only for its CLIP normaliser and pre-tokeniser
    bpe = Tokenizer(BPE(end_of_word_suffix="</w>", unk_token=_EOS))
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[_BOS, _EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" "))
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [a + "</w>" for a in alphabet]
    known = set(tokens)
    kept = []
    for left, right in merges:
        if left in known and right in known and left + right not in known:
            kept.append((left, right))
            tokens.append(left + right)
            known.add(left + right)
    vocab = {token: i for i, token in enumerate([*tokens, _BOS, _EOS])}
    return CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=_MAX_TEXT_LEN)


def _build_model(tokenizer: CLIPTokenizer, seed: int, image_size: int) -> CLIPModel:
    """A freshly initialised tiny ``CLIPModel`` whose text config matches ``tokenizer``'s special tokens."""
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_TEXT_LEN,
        "projection_dim": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
        "projection_dim": 128,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)
    torch.manual_seed(seed)
    return CLIPModel(config)


@torch.no_grad()
def _zero_shot_accuracy(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    template: str = ZERO_SHOT_TEMPLATE,
) -> float:
    """Top-1 accuracy of zero-shot classification of ``pixel_values`` (N, 3, H, W) against ``labels`` (N,)."""
    model.eval()
    prompts = [template.format(c.replace("_", " ")) for c in SYNTHETIC_CLASSES]
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    text_emb = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    image_emb = torch.nn.functional.normalize(
        model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1
    )
    return (image_emb @ text_emb.T).argmax(dim=-1).eq(labels).float().mean().item()


def evaluate_zero_shot(
    model: CLIPModel, processor: CLIPProcessor, seed: int = 12345, images_per_class: int = 10
) -> dict[str, float]:
    """Per-domain zero-shot accuracy with ``"a photo of a {}."`` on freshly rendered synthetic images.

    Images come from a seed stream disjoint from pretraining. Returns ``{domain: accuracy}``.
    """
    results = {}
    labels = torch.arange(len(SYNTHETIC_CLASSES)).repeat_interleave(images_per_class)
    classes = [SYNTHETIC_CLASSES[i] for i in labels.tolist()]
    for d, domain in enumerate(SYNTHETIC_DOMAINS):
        pixels = _render_batch([domain] * len(classes), classes, seed, 1000 + d, processor.image_processor)
        results[domain] = _zero_shot_accuracy(model, processor.tokenizer, pixels, labels)
    return results


def _configure_determinism(seed: int, num_threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)


def label_aware_clip_loss(
    logits_per_image: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor | None = None,
    cross_domain_weight: float = 1.0,
    named: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric image-text cross-entropy where pairs of the same class are positives.

    ``logits_per_image``: ``(B, B)`` scaled cosine similarities (image i, caption j); ``labels``: ``(B,)``
    class ids; ``domains``: ``(B,)`` domain ids or ``None``. A pair of the same class and domain has target
    weight 1, a pair of the same class in another domain ``cross_domain_weight`` (1: the domain does not
    matter; 0: a caption is a positive only for images of its own style, as "a sketch of a cat" does not
    describe a photo of a cat). ``named``: ``(B,)`` bool or ``None`` (all named); a caption that does not
    name its object ("a sketch.") is a positive, weight 1, for every image of its own domain (``domains``
    required). Each row's target is its weights normalised to sum 1; with one positive per row this is
    CLIP's InfoNCE.
    """
    weights = (labels[:, None] == labels[None, :]).to(logits_per_image.dtype)
    if domains is not None:
        other_domain = domains[:, None] != domains[None, :]
        weights = weights * torch.where(other_domain, cross_domain_weight, 1.0).to(weights.dtype)
    if named is not None:
        if domains is None:
            raise ValueError("label_aware_clip_loss: captions marked unnamed need the domains of the pairs.")
        same_domain = (domains[:, None] == domains[None, :]).to(weights.dtype)
        weights = torch.where(named[None, :], weights, same_domain)
    image_targets = weights / weights.sum(dim=1, keepdim=True)
    per_caption = weights.t()  # (caption j, image i)
    text_targets = per_caption / per_caption.sum(dim=1, keepdim=True)
    image_to_text = -(image_targets * torch.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_to_image = -(text_targets * torch.log_softmax(logits_per_image.t(), dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def pretrain_tiny_clip(
    output_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 128,
    num_pairs: int = 16000,
    lr: float = 1e-3,
    vocab_size: int = 1024,
    num_threads: int = 2,
    log_every: int = 100,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cross_domain_weight: float = 1.0,
    unnamed_captions: bool = False,
    home_domain_share: float | None = None,
) -> dict[str, object]:
    """Pretrain the tiny CLIP from scratch on synthetic image–caption pairs and save it to ``output_dir``.

    Renders ``num_pairs`` pairs (uneven domain mix), trains the tokenizer on their captions, then runs
    ``steps`` AdamW steps of batch ``batch_size`` (cosine schedule with warm-up) on
    `label_aware_clip_loss` with ``cross_domain_weight`` (1, the shipped model: every caption of the object
    is a positive; 0: only captions of the image's own style are). ``unnamed_captions``: replace a share of
    the Clipart, Sketch and Painting captions by style-only ones (:data:`UNNAMED_SHARE`), which are positives
    for every image of their style (a pilot world, not the shipped model). ``home_domain_share``: draw that
    share of each object's pairs in its :func:`home_domain` (another pilot world; ``None``: styles
    independent of objects, the shipped model). ``image_size`` (a multiple of the 8-px patch) sets the
    image tokens per layer: ``(image_size / 8)² + 1``. Deterministic for a given seed and thread count. Writes ``config.json``, ``model.safetensors``, tokenizer files,
    ``preprocessor_config.json`` and ``pretraining.json`` (arguments, run time, final loss, per-domain
    zero-shot accuracy), which is also returned.
    """
    if image_size < 8 or image_size % 8:
        raise ValueError(
            f"Invalid image_size={image_size}: expected a positive multiple of the 8-pixel patch."
        )
    if steps < 1 or batch_size < 2 or num_pairs < batch_size:
        raise ValueError(
            f"Invalid steps={steps}, batch_size={batch_size}, num_pairs={num_pairs}: expected "
            "steps >= 1, batch_size >= 2 and num_pairs >= batch_size."
        )
    if not 0.0 <= cross_domain_weight <= 1.0:
        raise ValueError(f"Invalid cross_domain_weight={cross_domain_weight}: expected a weight in [0, 1].")
    if home_domain_share is not None and not 0.0 <= home_domain_share <= 1.0:
        raise ValueError(
            f"Invalid home_domain_share={home_domain_share}: expected a share in [0, 1] or None."
        )
    start = time.perf_counter()
    _configure_determinism(seed, num_threads)
    domains, classes, captions, named = caption_corpus(seed, num_pairs, unnamed_captions, home_domain_share)
    # The tokenizer always learns from the full-size caption corpus (captions are cheap to draw): BPE merges
    # of tied counts come out in a run-dependent order on small corpora, never on this one.
    tokenizer = _train_tokenizer(
        caption_corpus(seed, _TOKENIZER_CAPTIONS, unnamed_captions, home_domain_share)[2], vocab_size
    )
    image_processor = clip_image_processor(image_size)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    images = _render_batch(domains, classes, seed, 2, image_processor)
    labels = torch.tensor([SYNTHETIC_CLASSES.index(c) for c in classes])
    domain_ids = torch.tensor([SYNTHETIC_DOMAINS.index(d) for d in domains])
    named_ids = torch.tensor(named) if unnamed_captions else None
    text = tokenizer(captions, padding=True, return_tensors="pt")
    model = _build_model(tokenizer, seed, image_size)
    model.train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "embedding" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_pairs, generator=generator)
    cursor, loss = 0, torch.tensor(float("nan"))
    for step in range(steps):
        if cursor + batch_size > num_pairs:
            order, cursor = torch.randperm(num_pairs, generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits = model(
            input_ids=text["input_ids"][idx],
            attention_mask=text["attention_mask"][idx],
            pixel_values=images[idx],
        ).logits_per_image
        loss = label_aware_clip_loss(
            logits,
            labels[idx],
            domain_ids[idx],
            cross_domain_weight,
            None if named_ids is None else named_ids[idx],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    train_time = time.perf_counter() - start
    model.eval()
    accuracy = evaluate_zero_shot(model, processor)
    report = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "num_pairs": num_pairs,
        "lr": lr,
        "image_size": image_size,
        "cross_domain_weight": cross_domain_weight,
        "unnamed_captions": unnamed_captions,
        "home_domain_share": home_domain_share,
        "vocab_size": len(tokenizer),
        "num_threads": num_threads,
        "torch_version": torch.__version__,
        "final_loss": round(loss.item(), 6),
        "train_seconds": round(train_time, 1),
        "zero_shot_template": ZERO_SHOT_TEMPLATE,
        "zero_shot_accuracy": accuracy,
    }
    _save(model, processor, Path(output_dir), report)
    return report


def _save(model: CLIPModel, processor: CLIPProcessor, output_dir: Path, report: dict[str, object]) -> None:
    """Write model, processors, CLIP-format ``vocab.json``/``merges.txt`` and the report, each file atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json, for standalone loading
        state = json.loads(processor.tokenizer.backend_tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
        vocab = dict(sorted(state["vocab"].items(), key=lambda item: item[1]))  # backend order is unstable
        atomic_write_json(Path(tmp) / "vocab.json", vocab)
        atomic_write_text(Path(tmp) / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        for file in sorted(Path(tmp).iterdir()):
            atomic_write(output_dir / file.name, lambda dst, src=file: dst.write_bytes(src.read_bytes()))
    atomic_write_json(output_dir / "pretraining.json", report)
