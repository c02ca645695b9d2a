"""The import graph of saepipe and the stages, read from the source with ``ast`` (nothing is imported).

Shared by tests/test_layout.py (layers, private names, cycles) and tests/test_pipeline.py (each
stage's import closure against its DVC dependencies).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("saepipe", "stages")
"""Top-level packages of the project (everything else is a third-party import)."""


class Import(NamedTuple):
    source: str
    """The importing module (dotted)."""
    target: str
    """The imported module (dotted): ``from a.b import c`` targets ``a.b.c`` when that is a module."""
    name: str | None
    """The name taken from ``target`` (``from a.b import name``), None for a module import."""
    line: int
    function_level: bool
    """Inside a function (run when called, not when the module loads)."""
    local_alias: str
    """The name the import binds in the importing module."""


def module_files() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (packages by their ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import statement of ``module``, at any depth, with its target resolved."""
    files = module_files()
    path = files[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    function_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        in_function = id(node) in function_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                out.append(Import(module, alias.name, None, node.lineno, in_function, bound))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target, name = (candidate, None) if candidate in files else (base, alias.name)
                out.append(Import(module, target, name, node.lineno, in_function, alias.asname or alias.name))
    return tuple(out)


def lazy_exports() -> dict[str, str]:
    """``saepipe``'s lazily imported public names (PEP 562 ``_LAZY``): name -> module."""
    tree = ast.parse((ROOT / "saepipe" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def project_imports(module: str) -> Iterator[Import]:
    """The imports of ``module`` that target the project's own modules."""
    files = module_files()
    lazy = lazy_exports()
    for imp in imports_of(module):
        if imp.target == "saepipe" and imp.name in lazy:  # `from saepipe import X`: X's real module
            yield imp._replace(target=lazy[imp.name], name=imp.name)
        elif is_project(imp.target):
            target = imp.target
            while target not in files and "." in target:  # `import a.b.c` of a name inside a.b
                target = target.rsplit(".", 1)[0]
            yield imp._replace(target=target)


def parents(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module`` does (``a``, ``a.b`` for ``a.b.c``)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(module: str) -> set[str]:
    """Every project module that importing ``module`` (and calling its functions) can load."""
    files = module_files()
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(p for p in parents(current) if p in files)
        todo.extend(imp.target for imp in project_imports(current))
    return seen
