"""Base CLIP checkpoints: the shipped tiny CLIP's portable name, and loading a model reference that fails
fast when the Hugging Face Hub cannot be reached.

A model reference is the shipped tiny CLIP's name `TINY_CLIP_NAME`, a local folder saved with
``save_pretrained``, or a Hub id (``org/name``). `resolve_model` tells ``from_pretrained`` where to find it:
before transformers is asked for a Hub id, one HEAD request for its ``config.json`` (no retry, bounded by
``HF_HUB_ETAG_TIMEOUT``, 10 s unless set) tells whether the Hub answers. If it does, transformers loads the
model exactly as it would on its own; if not, a cached copy is loaded without contacting the Hub again, and
an uncached one fails at once with one message, instead of transformers' minutes of silent retries.

The module imports nothing heavy (``peft-mmap --help`` imports it): huggingface_hub and transformers are
imported on use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TINY_CLIP_NAME = "peft_mmap:tiny-clip"
"""The portable name of the shipped tiny CLIP, written to adapter configs, manifests and model cards in place
of its folder; every loader of this package (and every ``--model`` option) resolves it to `TINY_CLIP_PATH`.
Not a valid Hub id: transformers refuses it without asking the Hub, and no Hub repository can take it."""
TINY_CLIP_PATH: Path = Path(__file__).resolve().parent / "assets" / "tiny-clip"
"""The shipped tiny CLIP's folder (see `peft_mmap.apps.tiny_clip`)."""

_CONFIG_NAME = "config.json"
Loaded = TypeVar("Loaded")


def portable_model_name(name_or_path: str | os.PathLike | None) -> str | None:
    """`TINY_CLIP_NAME` for the shipped tiny CLIP (its name or any path to its folder), else ``name_or_path``
    unchanged (as a string): a Hub id stays the Hub id, a user's own folder stays the path it was given."""
    if name_or_path is None:
        return None
    text = str(name_or_path)
    if text == TINY_CLIP_NAME or (os.path.isdir(text) and Path(text).resolve() == TINY_CLIP_PATH):
        return TINY_CLIP_NAME
    return text


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` finds a model reference.

    Attributes:
        name: the folder or Hub id to pass to ``from_pretrained``.
        local_files_only: load without contacting the Hub (the shipped tiny CLIP, or a cached Hub model while
            the Hub cannot be reached).
    """

    name: str
    local_files_only: bool


def resolve_model(reference: str | os.PathLike) -> ModelSource:
    """Where ``from_pretrained`` finds ``reference`` (see the module docstring).

    The shipped tiny CLIP's name resolves to its folder; a local folder, anything that is not a Hub id, and
    every reference under ``HF_HUB_OFFLINE=1`` are passed on unchanged (transformers reports its own errors).

    Raises:
        OSError: ``reference`` is a Hub id, the Hub did not answer and the model is not in the local cache.
    """
    text = str(reference)
    if text == TINY_CLIP_NAME:
        return ModelSource(str(TINY_CLIP_PATH), local_files_only=True)
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    if is_offline_mode() or not is_hub_id(text):
        return ModelSource(text, local_files_only=False)
    error = _hub_connection_error(text)
    if error is None:
        return ModelSource(text, local_files_only=False)
    if isinstance(try_to_load_from_cache(text, _CONFIG_NAME), str):
        logger.info(
            "The Hugging Face Hub could not be reached (%s); loading %s from the local cache.", error, text
        )
        return ModelSource(text, local_files_only=True)
    raise OSError(
        f"{text}: no network: the Hugging Face Hub ({constants.ENDPOINT}) could not be reached "
        f"({type(error).__name__}: {error}), and the model is not in the local cache. Give a local folder "
        "instead (a CLIP checkpoint saved with save_pretrained, e.g. /path/to/clip-vit-base-patch16), or "
        "download the model once with network access and set HF_HUB_OFFLINE=1 to use the cached copy."
    )


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a Hub repository: a valid repo id that is not a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_connection_error(repo_id: str) -> Exception | None:
    """The error of one HEAD request for ``repo_id``'s ``config.json`` that reached no Hub (no connection, a
    timeout, a proxy failure), or ``None`` when the Hub answered, whatever the answer (a missing or private
    repository is left to transformers' own message)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, _CONFIG_NAME), timeout=constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False
        )
    except httpx.TransportError as error:
        return error
    except HfHubHTTPError:  # the Hub answered
        pass
    return None


def load_pretrained(cls: type[Loaded], reference: str | os.PathLike, **kwargs) -> Loaded:
    """``cls.from_pretrained`` (a transformers model, tokenizer or processor class) for a model reference,
    resolved by `resolve_model`; ``kwargs`` go to ``from_pretrained``.

    Raises:
        OSError: the Hub could not be reached and the model is not cached (see `resolve_model`), or
            transformers' own loading errors.
    """
    source = resolve_model(reference)
    if source.local_files_only:
        kwargs["local_files_only"] = True
    return cls.from_pretrained(source.name, **kwargs)


#: ``from_pretrained`` arguments that say where files come from (also used to read a model's config).
_HUB_KWARGS = ("local_files_only", "revision", "cache_dir", "token")


def load_clip_model(reference: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """The dual encoder of a model reference (see `load_pretrained`), of the model class its ``config.json``'s
    type has in transformers' ``MODEL_MAPPING`` (what ``AutoModel`` picks): a ``CLIPModel``, ``SiglipModel``,
    ``MetaClip2Model``, ...

    Not ``AutoModel.from_pretrained`` itself: in transformers 5.25 its look-up of a PEFT adapter in the
    repository ignores ``local_files_only`` and asks the Hub (with retries) even for a cached model.
    """
    from transformers import MODEL_MAPPING, AutoConfig

    source = resolve_model(reference)
    if source.local_files_only:
        kwargs["local_files_only"] = True
    config = AutoConfig.from_pretrained(source.name, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    return MODEL_MAPPING[type(config)].from_pretrained(source.name, config=config, **kwargs)
