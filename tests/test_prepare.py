"""prepare: filters, truncation, dedupe, sampling, split determinism, outputs and the click stage."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from saepipe.texts.config import PrepareConfig
from saepipe.texts.prepare import (
    SCHEMA,
    assign_splits,
    prepare_texts,
    read_prepared,
    truncate_text,
    write_prepared,
)
from saepipe.texts.sources import TextRecord
from stages.prepare import main as prepare_stage

ARGS = dict(min_chars=10, max_chars=60, max_texts=None, eval_fraction=0.25, seed=0)


def _records(n: int, source: str = "s") -> list[TextRecord]:
    return [TextRecord(f"text number {i} with some words.", source) for i in range(n)]


def test_counts_filters_dedupe_truncation():
    long = "First sentence here. Second sentence is a bit longer. Third sentence runs past the end."
    records = [
        TextRecord("  padded text that is long enough  ", "a"),
        TextRecord("short", "a"),  # too short
        TextRecord("   ", "a"),  # too short (empty after strip)
        TextRecord("padded text that is long enough", "b"),  # duplicate after strip
        TextRecord(long, "b"),  # truncated
        TextRecord(
            long[:53] + " Another tail that is cut away.", "b"
        ),  # duplicate after truncation
        TextRecord("another distinct passage", "b"),
    ]
    result = prepare_texts(records, **ARGS)
    c = result.counts
    assert (c.read, c.too_short, c.duplicate, c.truncated, c.over_max_texts) == (7, 2, 2, 2, 0)
    assert c.kept == 3 == c.train + c.eval == result.table.num_rows
    assert c.eval == 1  # round(3 * 0.25) = 1
    assert c.kept_by_source == {"a": 1, "b": 2}
    texts = result.table["text"].to_pylist()
    assert texts == [
        "padded text that is long enough",
        "First sentence here. Second sentence is a bit longer.",  # cut at a sentence end
        "another distinct passage",
    ]
    assert result.table["id"].to_pylist() == [0, 1, 2]
    assert result.table["source"].to_pylist() == ["a", "b", "b"]
    assert result.table.schema == SCHEMA


def test_truncate_prefers_sentence_then_word():
    text = "Alpha beta gamma. Delta epsilon zeta eta theta iota kappa lambda"
    assert truncate_text(text, 30) == "Alpha beta gamma."
    assert truncate_text(text, 50) == "Alpha beta gamma. Delta epsilon zeta eta theta"
    assert truncate_text("x" * 100, 40) == "x" * 40  # no boundary: hard cut
    # A sentence end too early (< max_chars // 2) is not used; a word boundary is.
    assert truncate_text("Hi. " + "word " * 30, 40) == ("Hi. " + "word " * 30)[:39].rstrip()
    assert truncate_text("fits", 10) == "fits"
    for n in range(5, 80):
        assert len(truncate_text(text, n)) <= n


def test_max_texts_sample_is_seeded_and_ordered():
    records = _records(100)
    a = prepare_texts(records, **{**ARGS, "max_texts": 20})
    b = prepare_texts(records, **{**ARGS, "max_texts": 20})
    c = prepare_texts(records, **{**ARGS, "max_texts": 20, "seed": 1})
    assert a.table.equals(b.table)
    assert a.counts.over_max_texts == 80 and a.counts.kept == 20
    numbers = [int(t.split()[2]) for t in a.table["text"].to_pylist()]
    assert numbers == sorted(numbers) and numbers != list(range(20))  # a sample, in source order
    assert a.table["text"].to_pylist() != c.table["text"].to_pylist()


def test_split_is_content_based_and_stable():
    texts = [r.text for r in _records(200)]
    splits = assign_splits(texts, 0.1, seed=3)
    assert splits.count("eval") == 20
    assert assign_splits(texts, 0.1, seed=3) == splits
    assert assign_splits(texts, 0.1, seed=4) != splits
    # Membership depends on the text, not its position.
    shuffled = dict(zip(texts[::-1], assign_splits(texts[::-1], 0.1, seed=3), strict=True))
    assert shuffled == dict(zip(texts, splits, strict=True))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_eval_never_empty_nor_everything(n):
    splits = assign_splits([r.text for r in _records(n)], 0.01, seed=0)
    assert splits.count("eval") == 1
    assert assign_splits([r.text for r in _records(n)], 0.99, seed=0).count("train") == 1
    assert assign_splits([r.text for r in _records(n)], 0.0, seed=0).count("eval") == 0


def test_empty_after_filter_errors(tmp_path):
    records = [TextRecord("x" * 5, "s")] * 120
    with pytest.raises(ValueError, match=r"all 120 texts are shorter than min_chars=10"):
        prepare_texts(records, **ARGS)
    with pytest.raises(ValueError, match="yielded no texts"):
        prepare_texts([], **ARGS)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_chars": 5}, r"prepare\.max_chars must be >= prepare\.min_chars \(10\), got 5"),
        ({"max_texts": 0}, r"prepare\.max_texts must be an integer >= 1 or null"),
        ({"eval_fraction": 1.0}, r"prepare\.eval_fraction must be a finite number in \[0, 1\)"),
        ({"min_chars": -1}, r"prepare\.min_chars must be an integer >= 0"),
    ],
)
def test_bad_args(override, message):
    with pytest.raises(ValueError, match=message):
        prepare_texts(_records(3), **{**ARGS, **override})


def test_params_reject_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in prepare params: prepare\.min_char;.*did you mean "
                                         r"prepare\.min_chars"):
        PrepareConfig.from_dict({"min_char": 3})


def test_write_outputs_open_in_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    result = prepare_texts(_records(40), **ARGS)
    texts_path, counts_path = write_prepared(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["counts.json", "texts.parquet"]
    assert json.loads(counts_path.read_text()) == result.counts.to_dict()
    ds = datasets.Dataset.from_parquet(str(texts_path), cache_dir=str(tmp_path / "hf_cache"))
    assert ds.column_names == ["id", "text", "source", "split"]
    assert ds["text"] == result.table["text"].to_pylist()
    evals = read_prepared(tmp_path / "out", split="eval")
    assert evals.num_rows == result.counts.eval == 10
    assert set(evals["split"].to_pylist()) == {"eval"}


def _params_file(tmp_path, **prepare) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": "default", "prepare": prepare, "sae": {"k": 4}}))
    return str(path)


def test_stage_cli(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"body": r.text}) + "\n" for r in _records(30)))
    params = _params_file(
        tmp_path, source=str(data), text_column="body", min_chars=10, max_chars=100,
        max_texts=25, eval_fraction=0.2, seed=7,
    )  # fmt: skip
    out = tmp_path / "data" / "prepare"
    result = CliRunner().invoke(prepare_stage, ["--params", params, "--out", str(out), "--sources", str(tmp_path)])
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "counts.json").read_text())
    assert (counts["read"], counts["kept"], counts["over_max_texts"]) == (30, 25, 5)
    assert (counts["train"], counts["eval"]) == (20, 5)
    assert counts["kept_by_source"] == {"texts.jsonl": 25}
    table = pq.read_table(out / "texts.parquet")
    assert table.schema == SCHEMA and table.num_rows == 25
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stage_cli_errors_write_nothing(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text("one\n\ntwo\n")
    params = _params_file(tmp_path, source=str(data), min_chars=50)
    out = tmp_path / "out"
    result = CliRunner().invoke(prepare_stage, ["--params", params, "--out", str(out), "--sources", str(tmp_path)])
    assert result.exit_code != 0
    assert "all 2 texts are shorter than min_chars=50" in result.output
    assert not out.exists()

    params = _params_file(tmp_path, source=str(data), min_chars=1, typo_key=3)
    result = CliRunner().invoke(prepare_stage, ["--params", params, "--out", str(out)])
    assert result.exit_code != 0 and "typo_key" in result.output
