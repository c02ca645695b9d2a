"""docs/saepipe.md documents every config field and is in sync with the code's docstrings."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from saepipe.runtime.params import read_params
from saepipe.sae.config import SAEConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "saepipe.md"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_is_up_to_date():
    text = DOC.read_text()
    assert _generator().regenerate(text) == text, "docs/saepipe.md is stale: run `uv run python docs/generate.py`"


def test_every_sae_field_has_a_documented_row():
    text = DOC.read_text()
    for f in dataclasses.fields(SAEConfig):
        row = re.search(rf"^\| `{f.name}` \| `sae\.{f.name}` \| `[^`]*` \| [^|]+ \| (.+) \|$", text, re.M)
        assert row, f"SAEConfig.{f.name} is missing from the docs table"
        assert len(row.group(1).strip()) > 10, f"SAEConfig.{f.name} has no meaning in the docs"


def test_every_params_key_is_documented():
    text = DOC.read_text()
    params = read_params(ROOT / "params.yaml")
    for section in ("prepare", "extract", "sae"):
        for key in params[section]:
            assert f"`{section}.{key}`" in text, f"params.yaml key {section}.{key} is not in docs/saepipe.md"
    assert "`normalize.chunk_rows`" in text and "`evaluate.max_tokens`" in text


def test_field_docs_reads_attribute_docstrings():
    docs = _generator().field_docs(SAEConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(SAEConfig)}
    assert docs["k"].startswith("Latents kept active per token")


ROBUSTNESS = ROOT / "docs" / "robustness.md"


def test_robustness_doc_is_up_to_date():
    text = ROBUSTNESS.read_text()
    assert _generator().regenerate(text) == text, "docs/robustness.md is stale: run `uv run python docs/generate.py`"


def test_robustness_doc_lists_every_params_key_and_only_tests_that_exist():
    from saepipe.cli import SECTIONS

    text = ROBUSTNESS.read_text()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{name}.{f.name}` |" in text, f"{name}.{f.name} has no row in docs/robustness.md"
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    for ref in sorted(set(re.findall(r"`(?:tests/)?(?:(test_\w+)\.py::)?(test_\w+)`", text))):
        module, test = ref
        where = [sources[f"{module}.py"]] if module else list(sources.values())
        assert any(f"def {test}(" in s for s in where), f"docs/robustness.md names {ref}, which does not exist"
