"""Regenerate the generated parts of docs/saepipe.md and docs/robustness.md from the code.

    uv run python docs/generate.py          # rewrite both in place
    uv run python docs/generate.py --check  # exit 1 when one is out of date

Blocks between ``<!-- generated:NAME -->`` and ``<!-- end generated:NAME -->`` are replaced:
``table:<section>`` is a config dataclass as a table (field, params.yaml key, default, params.yaml
value, meaning: the field's docstring); ``validation:<section>`` the checks of each of its keys (the
``Rule`` in the config's ``RULES``, what YAML forms it reads, the tests covering it);
``doc:<module>`` is a module's docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "saepipe.md"
DOCS = (DOC, ROOT / "docs" / "robustness.md")

TABLES = {  # params.yaml section -> "module:Class"
    "sweep": "saepipe.sae.config:SweepConfig",
    "prepare": "saepipe.texts.config:PrepareConfig",
    "extract": "saepipe.activations.config:ExtractConfig",
    "normalize": "saepipe.activations.config:NormalizeConfig",
    "sae": "saepipe.sae.config:SAEConfig",
    "evaluate": "saepipe.evaluation.config:EvaluateConfig",
    "analyze": "saepipe.analysis.config:AnalysisConfig",
}
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w:.]+) -->\n)(?P<body>.*?)(<!-- end generated:(?P=name) -->)", re.S)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a class body (PEP 257 attribute docstrings)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def yaml_value(value: Any) -> str:
    """A value as written in params.yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_table(section: str) -> str:
    """Markdown table of a config dataclass and its params.yaml section."""
    from saepipe.runtime.params import read_params

    module, name = TABLES[section].split(":")
    cls = getattr(importlib.import_module(module), name)
    docs = field_docs(cls)
    params = read_params(ROOT / "params.yaml").get(section) or {}
    rows = [f"| field | params.yaml key | default ({name}) | params.yaml | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        in_params = f"`{yaml_value(params[f.name])}`" if f.name in params else "—"
        meaning = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{section}.{f.name}` | `{yaml_value(default)}` | {in_params} | {meaning} |")
    return "\n".join(rows) + "\n"


_COERCED = {  # Rule class name -> the forms YAML or a user commonly writes that it reads, with a warning
    "Int": '`"6"`, `1.0e6`, `"1e6"` -> int',
    "Float": '`3e-4` (a string in YAML) -> 0.0003',
    "Bool": '`"true"`/`"false"`, yes/no, on/off -> bool',
    "Choice": "another letter case",
    "Str": "a number -> its text",
    "Encoding": "—",
    "StrList": "one string -> a list of one",
    "SiteIds": "—",
    "Variants": "a variant's values as its `sae:` keys read them",
}

VALIDATION_TESTS = ("`tests/test_params.py` (hypothesis: valid values construct, an invalid one raises "
                    "`ParamsError` naming the key, any junk is valid or a `ParamsError`)")


def validation_table(section: str) -> str:
    """Markdown table of the checks of a params section: the ``Rule`` of each key and what it reads."""
    module, name = TABLES[section].split(":")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| key | default | valid values (else `ParamsError`) | also read, with a warning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rule = cls.RULES[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"| `{section}.{f.name}` | `{yaml_value(default)}` | {rule.describe()} | "
                    f"{_COERCED[type(rule).__name__]} |")
    together = inspect.getdoc(cls.__dict__["check_together"]) if "check_together" in cls.__dict__ else ""
    note = f"\nBetween keys: {together}\n" if together else ""
    return "\n".join(rows) + "\n" + note


def module_doc(module: str) -> str:
    """A module's docstring as a text block."""
    doc = inspect.cleandoc(importlib.import_module(module).__doc__ or "")
    return f"```text\n{doc}\n```\n"


def render(name: str) -> str:
    kind, _, arg = name.partition(":")
    if kind == "table":
        return config_table(arg)
    if kind == "validation":
        return validation_table(arg)
    if kind == "doc":
        return module_doc(arg)
    raise ValueError(f"unknown generated block {name!r}")


def regenerate(text: str) -> str:
    """``text`` with every generated block rendered from the current code."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import saepipe  # noqa: F401  (fast BLAS before anything imports mlx)

    stale = []
    for doc in DOCS:
        current = doc.read_text()
        new = regenerate(current)
        if new == current:
            continue
        stale.append(doc)
        if "--check" not in argv:
            doc.write_text(new)
    if "--check" in argv and stale:
        print(f"{', '.join(map(str, stale))} out of date: run `uv run python docs/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
