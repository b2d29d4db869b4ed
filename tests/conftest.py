"""Shared fixtures: tiny CLIP models built from config (no downloads)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

TEXT_HIDDEN, VISION_HIDDEN, LAYERS = 32, 48, 3


def tiny_clip_config(attn_implementation: str = "sdpa", **overrides) -> CLIPConfig:
    """A 3-layer CLIP with d_l=32, d_v=48 (n=8 divides both); EOS id 2 is the legacy argmax pooling."""
    text = dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=99,
        max_position_embeddings=20,
        eos_token_id=98,
        bos_token_id=97,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)
    config._attn_implementation = attn_implementation
    return config


def make_clip(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(attn_implementation, **overrides)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def mmap_with_random_prompts(clip: CLIPModel, names: tuple[str, ...] = ("group0", "art"), **cfg):
    """``clip`` with MmAP adapters ``names`` (b=4, m×n=2×8), all active, every factor drawn from N(0, 1) so that
    every entry of kron(M, P) differs."""
    from peft import get_peft_model

    from peft_mmap import MmAPConfig

    config = MmAPConfig(prompt_length=4, source_shape=(2, 8), **cfg)
    model = get_peft_model(clip, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.base_model.set_adapter(list(names))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


PLACEHOLDER_ID = 50
"""A token id of the tiny CLIP's vocabulary (not SOS, EOS or padding) that fills placeholder positions."""


def with_placeholders(batch: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """``batch`` with ``count`` placeholder tokens after SOS in every caption, as ``text_placement="replace"``
    expects: ``[SOS, X * count, words, EOS, pad...]``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    fill = torch.full((ids.shape[0], count), PLACEHOLDER_ID, dtype=ids.dtype)
    return {
        **batch,
        "input_ids": torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1),
        "attention_mask": torch.cat([mask[:, :1], torch.ones_like(fill), mask[:, 1:]], dim=1),
    }


def projection_loss(tensor: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A scalar that depends on every entry of ``tensor`` (any shape): ``(tensor * w).sum()`` with ``w`` fixed
    N(0, 1) weights drawn from ``seed``. Gradient tests use it, not ``tensor.sum()``: the sum of a LayerNorm's
    outputs (``pooler_output``, ``last_hidden_state``) is the sum of its bias whatever the input, so its true
    gradient is zero and only rounding noise reaches the parameters."""
    weights = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed))
    return (tensor * weights.to(tensor)).sum()


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> None:
    """``got`` equals ``want`` up to rounding (another summation order, kernel or CPU instruction set: AVX-512,
    AVX2 or none): entries may differ by ``tol`` relatively, or by ``tol`` times ``want``'s largest finite
    magnitude. The scale is the whole tensor's because a gradient summed from large terms that cancel keeps
    their rounding: float32 gradients of the tiny CLIP move by up to 2e-5 of their tensor's largest entry
    between CPU kernels. ``tol`` defaults to 1000 float eps of ``want``'s dtype (1.2e-4 in float32); a wrong
    factor, mask or prompt moves results by far more."""
    tol = 1000 * torch.finfo(want.dtype).eps if tol is None else tol
    finite = want[want.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.fixture
def clip() -> CLIPModel:
    return make_clip()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two captions (one padded) and two images."""
    torch.manual_seed(1)
    return {
        "input_ids": torch.tensor([[97, 5, 6, 7, 98], [97, 8, 98, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "pixel_values": torch.randn(2, 3, 16, 16),
    }


def write_char_tokenizer(folder) -> None:
    """A real CLIP BPE tokenizer over single characters (no merges), ids matching `tiny_clip_config`."""
    import json

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    tokens = [c for c in chars] + [c + "</w>" for c in chars]
    tokens += [f"<unused{i}>" for i in range(97 - len(tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_char_tokenizer(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=20)
    assert tok.bos_token_id == 97 and tok.eos_token_id == 98
    return tok


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
WORKSPACE_TASKS = ("art", "clipart", "product")


def make_workspace(root, tokenizer):
    """``root/data/<task>/<colour>/*.png`` (3 tasks x 3 classes x 4 images) and ``root/model`` (tiny CLIP +
    processor), so the library and CLI can run end to end as on a real checkpoint and dataset."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    for t, task in enumerate(WORKSPACE_TASKS):
        for name, colour in COLOURS.items():
            folder = root / "data" / task / name
            folder.mkdir(parents=True)
            for i in range(4):
                shade = tuple(min(255, c + 8 * i + 5 * t) for c in colour)
                Image.new("RGB", (20, 20), shade).save(folder / f"{i}.png")
    processor = CLIPProcessor(
        CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tokenizer
    )
    make_clip().save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, tokenizer):
    return make_workspace(tmp_path_factory.mktemp("workspace"), tokenizer)


@contextlib.contextmanager
def process_umask(mask: int) -> Iterator[int]:
    """Run the block under umask ``mask`` (restored afterwards)."""
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def assert_umask_modes(root: Path, mask: int) -> int:
    """Every folder and file under ``root`` (included) has the mode a new one gets under ``mask``:
    ``0o777 & ~mask`` for folders, ``0o666 & ~mask`` for files. Returns how many files were checked."""
    files = 0
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == expected, f"{path}: mode {mode:04o}, expected {expected:04o} under umask {mask:03o}"
        files += path.is_file()
    return files


CLOSED_PORT_ENDPOINT = "http://127.0.0.1:9"
"""An endpoint nothing listens on (the discard port): a Hub that refuses every connection at once."""


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """The environment of a fresh process that would use the Hub at ``endpoint`` (``HF_HUB_OFFLINE`` unset), with
    an empty cache in ``hf_home``, a metadata timeout of 1 s and this checkout on the path; no traffic leaves
    the machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    root = str(Path(__file__).resolve().parents[1])
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_ETAG_TIMEOUT="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    return env


@contextlib.contextmanager
def unanswered_hub() -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """A local endpoint that accepts connections and never answers: a Hub behind a network that drops replies.

    Yields its URL and a function returning the request lines received so far (``"HEAD /org/name/resolve/
    main/config.json"``, one per request, so a retried request shows up twice). Requests wait in the listening
    socket's queue; nothing runs in the background.
    """
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    lines: list[str] = []

    def requests() -> list[str]:
        server.setblocking(False)
        while True:
            try:
                connection, _ = server.accept()
            except BlockingIOError:
                return list(lines)
            with connection:
                connection.settimeout(5)
                first = connection.recv(65536).decode("latin-1").split("\r\n", 1)[0]
            lines.append(" ".join(first.split()[:2]))

    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", requests
    finally:
        server.close()
