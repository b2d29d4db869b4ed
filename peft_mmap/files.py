"""Safe file handling: atomic writes and file-name checks.

Every file the library writes (adapters, manifests, checkpoints, split files, results) goes through
:func:`atomic_write`, so a crash or ``kill -9`` mid-write leaves the previous version intact. Temporary
files and folders are created with mode ``0o666``/``0o777`` filtered by the process umask (not the ``0o600``/
``0o700`` of ``tempfile``), and a writer that replaces the temporary file with its own (safetensors saves
through a ``0o600`` temporary file) has its mode reset before the rename, so what the library writes gets
the permissions of any other new file (``0o644``/``0o755`` under umask ``022``) and stays readable by the
other users of a shared cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def _create_unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create(parent / (prefix + random + suffix))`` for a name that does not exist yet; returns the path."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"Could not create a unique temporary name {prefix}*{suffix} in {parent}.")


def make_temp_file(parent: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """Create a new empty file ``parent/<prefix><random><suffix>`` with umask-normal permissions."""

    def create(candidate: Path) -> None:
        os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    return _create_unique(Path(parent), prefix, suffix, create)


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """Create a new empty folder ``parent/<prefix><random><suffix>`` with umask-normal permissions."""
    return _create_unique(Path(parent), prefix, suffix, lambda candidate: candidate.mkdir(0o777))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_file_mode(directory: str | os.PathLike) -> int:
    """The permission bits a new file in ``directory`` gets (``0o666`` filtered by the umask), read from a
    probe file without changing the process umask."""
    probe = make_temp_file(directory, prefix=".mode-probe.")
    try:
        return _mode(probe)
    finally:
        probe.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    The temporary file is created with umask-normal permissions, which ``path`` gets after the rename even
    if the writer replaced the temporary file with one of its own. On any exception the temporary file is
    removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(target.parent, prefix=f".{target.name}.")
    mode = _mode(tmp)
    try:
        yield tmp
        if _mode(tmp) != mode:
            tmp.chmod(mode)
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


def _swap_names(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    final = Path(path)
    return final, final.with_name(f"{final.name}.new"), final.with_name(f"{final.name}.old")


def replace_directory(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Replace the folder ``path`` by the one ``write(staging)`` fills, keeping a complete version at all times.

    ``write`` fills ``<path>.new/`` (through `atomic_write`, so with normal permissions); then the current
    folder becomes ``<path>.old/``, ``<path>.new/`` becomes ``path``, and ``<path>.old/`` is removed. A crash
    leaves ``path`` complete or, between the two renames, ``<path>.old/`` (`complete_directory` finds it).
    For folders the library owns (training checkpoints); a save into a folder that may hold a user's other
    files replaces a set of files instead (`peft_mmap.manifest.commit_staged`), since a swap would drop them.
    """
    final, staging, previous = _swap_names(path)
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if final.exists():  # keep .old while it is the only complete version left
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def complete_directory(path: str | os.PathLike, is_complete: Callable[[Path], bool]) -> Path | None:
    """The complete version of a folder written by `replace_directory`: ``path``, else ``<path>.old/`` (a
    swap cut short between its renames), else ``None``."""
    final, _, previous = _swap_names(path)
    return next((folder for folder in (final, previous) if is_complete(folder)), None)


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


def _read_safetensors(path: str | os.PathLike, what: str, read: Callable[[Path], Any]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return read(p)
    except Exception as err:  # safetensors raises several error types for damaged files
        raise ValueError(f"{what} {p} is truncated, corrupted or not a safetensors file: {err}") from err


def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle) with a clear error for a missing, truncated or corrupted file."""
    from safetensors.torch import load_file

    return _read_safetensors(path, what, load_file)


def check_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, tuple[int, ...]]:
    """Validate a safetensors file's header and layout without reading the tensors; returns its shapes.

    Raises the same errors as `load_safetensors` (naming the file) for a missing, truncated or corrupted file.
    """

    def shapes(p: Path) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        with safe_open(p, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118

    return _read_safetensors(path, what, shapes)


def check_state_dict(
    expected: Mapping[str, Sequence[int] | torch.Tensor],
    found: Mapping[str, Sequence[int] | torch.Tensor],
    what: str,
) -> None:
    """Refuse ``found`` unless it has exactly the names and shapes of ``expected`` (tensors or shapes).

    The one strict check of every loader, run before anything is copied. Raises a ``ValueError`` that starts
    with ``what`` (a subject such as ``"Adapter 'art'"``, or a clause ending in a colon) and names up to four
    problems: ``unexpected weight``, ``missing weight`` and ``weight ... has shape ..., but this base model
    expects ...`` (a shape mismatch).
    """

    def shape(value: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    problems = [f"unexpected weight {k!r} {shape(v)}" for k, v in found.items() if k not in expected]
    problems += [f"missing weight {k!r} {shape(v)}" for k, v in expected.items() if k not in found]
    for k, v in expected.items():
        if k in found and shape(found[k]) != shape(v):
            got, want = shape(found[k]), shape(v)
            problems.append(
                f"weight {k!r} has shape {got}, but this base model expects {want} "
                f"(shape mismatch: checkpoint {got} vs model {want})"
            )
    if problems:
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(f"{what} {'; '.join(problems[:4])}{more}.")
