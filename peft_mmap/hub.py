"""Model cards and Hub upload for MmAP adapters saved in PEFT's layout."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi
from peft import PeftModel

from .base_models import TINY_CLIP_NAME, is_hub_id, portable_model_name
from .families import model_family
from .files import atomic_write_text
from .model import MmAPModel


def save_adapters(peft_model: PeftModel, directory: str | Path, **kwargs) -> None:
    """``peft_model.save_pretrained(directory, **kwargs)`` without PEFT's check for changed embedding layers.

    MmAP adapters hold no embedding weights, so PEFT's "auto" check (did the vocabulary change?) has nothing to
    find; it looks the base model up on the Hub (one request per adapter) and warns for a name it cannot find
    there, such as any Hub id under ``HF_HUB_OFFLINE=1`` or the shipped tiny CLIP's portable name read back
    from a saved config.
    """
    peft_model.save_pretrained(directory, save_embedding_layers=False, **kwargs)


def adapter_parameter_counts(peft_model: PeftModel) -> dict[str, int]:
    """Number of parameters of each MmAP adapter (source prompts plus scaling matrices of both towers)."""
    tuner: MmAPModel = peft_model.base_model
    counts = {name: 0 for name in tuner.peft_config}
    for key, param in tuner.named_parameters():
        parts = key.split(".")
        if "mmap_source" in parts or "mmap_scale" in parts:
            counts[parts[-1]] += param.numel()
    return counts


def model_card(peft_model: PeftModel, title: str | None = None, extra: str = "") -> str:
    """A Hub model card (YAML front matter + Markdown) naming the base model, adapters and their sizes; the
    title defaults to "MmAP adapters for <family>" (CLIP, SigLIP, ...).

    The base model is named as the adapters' configs name it: the Hub id, the shipped tiny CLIP's portable
    name (`peft_mmap.base_models.TINY_CLIP_NAME`) or a local path; the front matter's ``base_model`` (which
    the Hub checks) is written for a Hub id only.
    """
    base = portable_model_name(getattr(peft_model.get_base_model().config, "_name_or_path", "") or None)
    base_name = base or "unknown"
    if base == TINY_CLIP_NAME:
        load_base = f'clip = peft_mmap.load_clip_model("{base}")'
    else:
        load_base = f'clip = AutoModel.from_pretrained("{base_name}")'
    counts = adapter_parameter_counts(peft_model)
    rows = []
    for name, config in peft_model.peft_config.items():
        folder = "." if name == "default" else f"{name}/"
        m, n = config.source_shape
        rows.append(
            f"| `{name}` | `{folder}` | {config.prompt_length} | {m}×{n} | "
            f"{config.depth or 'all'} | {config.text_placement} | {counts[name]:,} |"
        )
    family = model_family(peft_model.get_base_model())
    title = title or f"MmAP adapters for {family.label}"
    tags = ["peft", "mmap", family.name, "prompt-tuning"]
    front = ["---", "library_name: peft", "tags:", *(f"- {tag}" for tag in tags)]
    if base is not None and is_hub_id(base):
        front.append(f"base_model: {base}")
    front.append("---")
    body = [
        f"# {title}",
        "",
        f"Multi-modal Alignment Prompts (MmAP, Xin et al., AAAI 2024) for `{base_name}`, trained with "
        "[peft_mmap](https://pypi.org/project/peft-mmap/).",
        "",
        "| adapter | folder | prompt length b | source m×n | depth | text prompts | parameters |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Total trainable parameters: {sum(counts.values()):,}.",
        "",
        "Text prompts: `insert` = extra tokens after SOS, the class prompt keeps its template; `replace` = the "
        "prompts take positions 1..T of the class prompt, in place of T placeholder tokens after SOS "
        "(`MmAPConfig.text_placement`).",
        "",
        "## Usage",
        "",
        "```python",
        "import peft_mmap  # registers the MMAP method with peft",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        load_base,
        'model = PeftModel.from_pretrained(clip, "<repo>", subfolder="<adapter>", adapter_name="<adapter>")',
        "```",
    ]
    if extra:
        body += ["", extra]
    return "\n".join([*front, "", *body]) + "\n"


def save_model_card(peft_model: PeftModel, directory: str | Path, **card_kwargs) -> Path:
    """Write ``README.md`` (see `model_card`) into ``directory`` atomically."""
    return atomic_write_text(Path(directory) / "README.md", model_card(peft_model, **card_kwargs))


def push_to_hub(
    peft_model: PeftModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MmAP adapters",
    api: HfApi | None = None,
) -> str:
    """Save every adapter in PEFT's layout plus an MmAP model card and upload them as one commit.

    Returns the URL of the commit. ``api`` defaults to ``HfApi(token=token)``.
    """

    def write(folder: Path) -> None:
        save_adapters(peft_model, folder)
        save_model_card(peft_model, folder)

    return upload(write, repo_id, private=private, token=token, commit_message=commit_message, api=api)


def upload(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str,
    api: HfApi | None = None,
) -> str:
    """The one Hub upload path: create ``repo_id`` if needed, let ``write`` fill a temporary folder and upload
    it as one commit. Returns the URL of the commit; ``api`` defaults to ``HfApi(token=token)``."""
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
