"""The package's shape, read from the source: layers point down, no private names cross modules, no
import cycles, and every import inside a function says why it is there.

Layers (docs/architecture.md): a module may import only from its own layer or lower ones.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.import_graph import ROOT, imports_of, module_files, project_imports

LAYERS = {
    "saepipe.runtime": 0,
    "saepipe.lm": 1,
    "saepipe.texts": 1,
    "saepipe.parallel": 1,
    "saepipe.activations": 2,
    "saepipe.sae": 3,
    "saepipe.training": 4,
    "saepipe.evaluation": 5,
    "saepipe.analysis": 6,
    "saepipe.dashboard": 6,
    "saepipe.api": 7,
    "saepipe.explore": 7,
    "saepipe.cli": 7,
    "saepipe": 7,  # the package itself: the lazy public API
    "stages": 8,
}

MODULES = sorted(module_files())


def layer(module: str) -> int:
    """The layer of a module: that of its longest listed prefix."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise KeyError(module)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_module_has_a_layer():
    """A new top-level module or subpackage needs a layer (else it would silently take the package's)."""
    for module in MODULES:
        if module.startswith("saepipe"):
            top = ".".join(module.split(".")[:2])
            assert top in LAYERS, f"{top} is in no layer: add it to LAYERS here and to docs/architecture.md"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    """Each project import (at module level or in a function) targets the same layer or a lower one."""
    for imp in project_imports(module):
        assert layer(imp.target) <= layer(module), (
            f"{module} (layer {layer(module)}) imports {imp.target} (layer {layer(imp.target)}) "
            f"at line {imp.line}: move the shared code down, or the importer up")


@pytest.mark.parametrize("module", MODULES)
def test_no_private_names_from_other_modules(module):
    """``from x import _name``, ``import x._y`` and ``x._name`` of another project module: make the name
    public where it is shared, or move it to the one module that uses it."""
    tree = ast.parse(module_files()[module].read_text())
    module_aliases: dict[str, str] = {}
    for imp in project_imports(module):
        parts = imp.target.split(".")
        assert not any(_is_private(p) for p in parts), f"{module}:{imp.line} imports private module {imp.target}"
        if imp.name is not None and imp.target != module:
            assert not _is_private(imp.name), f"{module}:{imp.line} imports private {imp.target}.{imp.name}"
        if imp.name is None:
            module_aliases[imp.local_alias] = imp.target
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and _is_private(node.attr)):
            target = module_aliases[node.value.id]
            assert target == module, f"{module}:{node.lineno} uses private {target}.{node.attr}"


def test_no_import_cycles():
    """Modules import each other in one direction only (function-level imports included: a lazy
    import hides a cycle, it does not remove it)."""
    graph = {m: {imp.target for imp in project_imports(m) if imp.target != m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", MODULES)
def test_function_level_imports_say_why(module):
    """An import inside a function is lazy on purpose (a heavy or optional dependency, an order that
    matters): a comment on its line, or the line above, says which."""
    lines = module_files()[module].read_text().splitlines()
    for imp in imports_of(module):
        if imp.function_level:
            here, above = lines[imp.line - 1], lines[imp.line - 2] if imp.line >= 2 else ""
            assert "#" in here or above.strip().startswith("#"), (
                f"{module}:{imp.line} imports {imp.target} inside a function without a comment saying why")


def test_the_layers_are_documented():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for prefix in LAYERS:
        if prefix.startswith("saepipe."):
            folder = prefix.removeprefix("saepipe.").replace(".", "/")
            assert re.search(rf"`(saepipe/)?{re.escape(folder)}(/|\.py)?`", doc), f"{prefix} is not in docs/architecture.md"
