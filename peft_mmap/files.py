"""Safe file handling: atomic writes and file-name checks.

Every file the library writes (adapters, manifests, checkpoints, split files, results) goes through
:func:`atomic_write`, so a crash or ``kill -9`` mid-write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are read, so the CLI's --help stays fast
    import torch

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def check_safe_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe single file-name component, else raise ``ValueError``.

    Safe means: a non-empty ``str`` of letters, digits, ``_`` and ``-`` that starts with a letter or
    digit (so no ``..``, no ``/``, no ``.``, no absolute path, no hidden file).
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(
            f"Invalid {what} {name!r}: expected a non-empty string of letters, digits, '_' and '-' "
            "starting with a letter or digit (it is used as a folder name)."
        )
    return name


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s contents to disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result onto ``path``. Returns ``Path(path)``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON to ``path`` (NaN/inf refused)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int | None = None) -> Any:
    """Read a JSON file with a clear error for a missing, oversized (``> max_bytes``) or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(
            f"{what} {p} is {size} bytes, more than the {max_bytes} allowed; refusing to parse it."
        )
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {p} is not valid JSON: {err}") from err


def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle) with a clear error for a missing, truncated or corrupted file."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return load_file(p)
    except Exception as err:  # safetensors raises several error types for damaged files
        raise ValueError(f"{what} {p} is truncated, corrupted or not a safetensors file: {err}") from err
