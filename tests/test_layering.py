"""The package's layers: imports point one way, ``import peft_mmap`` stays light, no writes to PEFT's privates.

Layers, lowest first (ARCHITECTURE.md): the PEFT method, the multi-task API, training and evaluation, the
apps. A module may import from its own layer or a lower one, never from a higher one, and the import graph
(function-level imports included, ``if TYPE_CHECKING:`` blocks excluded) has no cycle.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import peft.peft_model
import peft.tuners.tuners_utils
from test_cli import run_python

import peft_mmap

PACKAGE = Path(peft_mmap.__file__).parent
METHOD, MULTITASK, TRAINING, APPS = range(4)
LAYER_NAMES = ("method", "multi-task", "training", "apps")

#: Every module outside ``peft_mmap.baselines`` and ``peft_mmap.apps`` (whose modules are placed as a whole).
LAYERS = {
    "peft_mmap": METHOD,
    "peft_mmap._autoregister": METHOD,
    "peft_mmap._version": METHOD,
    "peft_mmap.base_models": METHOD,
    "peft_mmap.checks": METHOD,
    "peft_mmap.files": METHOD,
    "peft_mmap.options": METHOD,
    "peft_mmap.peft_type": METHOD,
    "peft_mmap.config": METHOD,
    "peft_mmap.layer": METHOD,
    "peft_mmap.prompting": METHOD,
    "peft_mmap.model": METHOD,
    "peft_mmap.registration": METHOD,
    "peft_mmap.hub": METHOD,
    "peft_mmap.classifier": MULTITASK,
    "peft_mmap.grouping": MULTITASK,
    "peft_mmap.manifest": MULTITASK,
    "peft_mmap.multitask": MULTITASK,
    "peft_mmap.augment": TRAINING,
    "peft_mmap.data": TRAINING,
    "peft_mmap.train_config": TRAINING,
    "peft_mmap.checkpoint": TRAINING,
    "peft_mmap.train": TRAINING,
    "peft_mmap.evaluate": TRAINING,
    "peft_mmap.affinity": TRAINING,
    "peft_mmap.presets": TRAINING,
}
SUBPACKAGES = {"peft_mmap.baselines": MULTITASK, "peft_mmap.apps": APPS}


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int:
    for package, layer in SUBPACKAGES.items():
        if module == package or module.startswith(package + "."):
            return layer
    if module not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to ARCHITECTURE.md).")
    return LAYERS[module]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: {peft_mmap modules it imports}}``, submodules resolved to the deepest existing module."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                prefix = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join([*prefix, *([node.module] if node.module else [])])
                candidates = [f"{module}.{alias.name}" for alias in node.names]
            for target in candidates:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_every_module_has_a_layer_and_imports_point_down():
    upward = [
        f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {target} ({LAYER_NAMES[layer_of(target)]})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target] if target in path else [*path, target]
            if target not in state:
                cycle = visit(target, [*path, target])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


def test_import_peft_mmap_loads_no_app_and_the_multitask_api_loads_no_training_module():
    script = (
        "import sys, peft_mmap\n"
        "print(*sorted(m for m in sys.modules if m.startswith('peft_mmap')))\n"
        "peft_mmap.MultiTaskMmAP, peft_mmap.MmAPConfig, peft_mmap.CLIPTaskClassifier\n"
        "print(*sorted(m for m in sys.modules if m.startswith('peft_mmap')))\n"
    )
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    on_import, with_api = (line.split() for line in result.stdout.splitlines())
    assert [m for m in on_import if layer_of(m) != METHOD] == []
    assert [m for m in with_api if layer_of(m) > MULTITASK] == []
    assert "peft_mmap.multitask" in with_api


def peft_private_attributes() -> set[str]:
    """Private attribute names PEFT's tuner and model classes define or assign (``_active_adapter``, ...)."""
    names = set()
    for module in (peft.tuners.tuners_utils, peft.peft_model):
        source = inspect.getsource(module)
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=(?!=)", source))
    for cls in (peft.tuners.tuners_utils.BaseTuner, peft.tuners.tuners_utils.BaseTunerLayer):
        names |= {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")}
    names -= {
        name for name in names if callable(getattr(peft.tuners.tuners_utils.BaseTunerLayer, name, None))
    }
    return names


def test_no_module_writes_a_peft_private_attribute():
    private = peft_private_attributes()
    assert "_active_adapter" in private and "_disable_adapters" in private
    writes = []
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                targets = [t.attr for t in targets if isinstance(t, ast.Attribute)]
            elif (
                isinstance(node, ast.Call)
                and ast.unparse(node.func).endswith("setattr")
                and len(node.args) > 1
            ):
                attr = node.args[1]
                targets = [attr.value] if isinstance(attr, ast.Constant) else []
            writes += [f"{name}:{node.lineno} writes {t}" for t in targets if t in private]
    assert not writes, writes
