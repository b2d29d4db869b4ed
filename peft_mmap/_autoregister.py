"""Register ``"MMAP"`` with peft as soon as both ``peft_mmap`` and ``peft`` are imported, in either order.

``import peft_mmap`` must make ``PeftModel.from_pretrained(clip, "<MMAP adapter>")`` work, but importing peft
takes seconds (it imports torch and transformers) and ``peft-mmap --help`` must not pay for that. So
``import peft_mmap`` does not import peft:

* if peft is already imported, `register_with_peft` registers at once;
* otherwise it puts a small finder first on ``sys.meta_path`` that wraps the loader of the top-level
  ``peft`` package, so registration runs right after ``peft/__init__.py`` has run, before ``import peft``
  returns. The finder also wraps the loaders of ``peft_mmap``'s own submodules: when one of them imports
  peft first (``peft_mmap.config`` does, to subclass ``PeftConfig``), registration would need modules that
  are still half-imported, so it waits until the outermost ``peft_mmap`` submodule has finished importing.

The finder removes itself once MMAP is registered; it imports nothing but the standard library. peft has no
plugin entry point, so a process that never imports ``peft_mmap`` cannot load an MMAP adapter: PEFT raises
``KeyError: 'MMAP'`` there (the README and the saved model cards say to ``import peft_mmap`` first).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from importlib.machinery import ModuleSpec
from types import ModuleType

PEFT = "peft"
PACKAGE = __name__.rpartition(".")[0]

_state = threading.local()  # .depth: peft_mmap submodules executing in this thread
_lock = threading.Lock()
_pending = False  # peft finished importing while a peft_mmap submodule was executing


def register_with_peft() -> None:
    """Register MMAP with peft now if peft is imported, else as soon as it is (idempotent)."""
    if PEFT in sys.modules:
        _register()
    elif not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def _register() -> None:
    from .registration import register

    register()
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PostImportFinder)]


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _after_peft() -> None:
    global _pending
    if _depth() == 0:
        _register()
    else:
        with _lock:
            _pending = True


def _after_own_module() -> None:
    global _pending
    with _lock:
        run, _pending = _pending, False
    if run:
        _register()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``peft`` and ``peft_mmap.*`` with the other finders and wraps their loaders (see the module
    docstring)."""

    def find_spec(self, fullname: str, path, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != PEFT and not fullname.startswith(f"{PACKAGE}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, is_peft=fullname == PEFT)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader; registers MMAP once the module has executed (see the module docstring)."""

    def __init__(self, loader: importlib.abc.Loader, is_peft: bool) -> None:
        self._loader = loader
        self._is_peft = is_peft

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self._is_peft:
            self._loader.exec_module(module)
            _after_peft()
            return
        _state.depth = _depth() + 1
        try:
            self._loader.exec_module(module)
        finally:
            _state.depth -= 1
        if _depth() == 0:
            _after_own_module()

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)
