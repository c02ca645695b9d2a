"""Text sources: local files of each format, local HF datasets, and the builtin corpus."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from saepipe.texts.corpus import SOURCES, builtin_corpus, split_passages
from saepipe.texts.sources import TextRecord, load_texts

ROWS = [
    {"id": 1, "body": "The first passage, with a comma.", "lang": "en"},
    {"id": 2, "body": 'A second one, "quoted",\nover two lines.', "lang": "en"},
    {"id": 3, "body": None, "lang": "en"},
]
BODIES = [ROWS[0]["body"], ROWS[1]["body"], ""]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep HF datasets' cache inside the test's tmp folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _texts(source, **kw) -> list[str]:
    return [r.text for r in load_texts(str(source), **kw)]


def test_txt_one_passage_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph\nstill first.\n\n  \nSecond paragraph.\n\n\nThird.\n")
    records = list(load_texts(str(path)))
    assert records == [
        TextRecord("First paragraph\nstill first.", "notes.txt"),
        TextRecord("Second paragraph.", "notes.txt"),
        TextRecord("Third.", "notes.txt"),
    ]


def test_jsonl_objects_and_strings(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in ROWS] + ["", json.dumps("a bare string")]
    path.write_text("\n".join(lines) + "\n")
    assert _texts(path, text_column="body") == [*BODIES, "a bare string"]


def test_jsonl_unknown_column_lists_keys(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(KeyError, match=r"no text column 'text'.*'body', 'id', 'lang'"):
        _texts(path)


def test_jsonl_bad_line_names_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:2: invalid JSON"):
        _texts(path)


def test_json_rows_and_columns(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))
    assert _texts(rows, text_column="body") == BODIES
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"body": [r["body"] for r in ROWS], "n": [1, 2, 3]}))
    assert _texts(cols, text_column="body") == BODIES
    with pytest.raises(KeyError, match=r"available: \['body', 'n'\]"):
        _texts(cols, text_column="text")


def test_parquet_and_csv(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "rows.parquet")
    assert _texts(tmp_path / "rows.parquet", text_column="body") == BODIES
    with pytest.raises(KeyError, match=r"no text column 'text'.*\['id', 'body', 'lang'\]"):
        _texts(tmp_path / "rows.parquet")
    with pytest.raises(TypeError, match=r"column 'id' has type int64, expected strings"):
        _texts(tmp_path / "rows.parquet", text_column="id")

    csv_path = tmp_path / "rows.csv"
    pcsv.write_csv(table, csv_path)
    records = list(load_texts(str(csv_path), text_column="body"))
    assert [r.text for r in records] == BODIES  # quoted field with a newline survives
    assert {r.source for r in records} == {"rows.csv"}
    # A numeric-looking column is read as text when asked for.
    assert _texts(csv_path, text_column="id") == ["1", "2", "3"]


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_texts(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(ValueError, match=r"unsupported text file type '.xml'"):
        load_texts(str(odd))


def test_hf_saved_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"body": r["body"], "n": r["id"]} for r in ROWS])
    ds.save_to_disk(str(tmp_path / "saved"))
    records = list(load_texts(str(tmp_path / "saved"), text_column="body"))
    assert [r.text for r in records] == BODIES
    assert {r.source for r in records} == {"saved"}
    with pytest.raises(KeyError, match=r"no text column 'text'.*\['body', 'n'\]"):
        load_texts(str(tmp_path / "saved"))

    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert (
        _texts(tmp_path / "saved_dict", dataset_split="validation", text_column="body")
        == BODIES[:1]
    )
    with pytest.raises(KeyError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_texts(str(tmp_path / "saved_dict"), dataset_split="test", text_column="body")


def test_hf_load_dataset_on_parquet_folder(tmp_path):
    """A folder of data files goes through the real ``datasets.load_dataset``."""
    folder = tmp_path / "pq_dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), folder / "train-00000.parquet")
    assert _texts(folder, text_column="body") == BODIES[:2]
    with pytest.raises(KeyError, match=r"available: \['id', 'body', 'lang'\]"):
        load_texts(str(folder), text_column="content")


def test_hf_hub_failure_names_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"could not load dataset 'org/name' \(config 'c'"):
        load_texts("org/name", dataset_config="c")


def test_split_passages_sentence_boundaries():
    sentence = "This sentence is exactly fifty characters long ok. "
    assert len(sentence) == 51
    text = sentence * 30  # 1530 chars
    passages = split_passages(text, min_chars=50, max_chars=500)
    assert all(len(p) <= 500 for p in passages)
    assert all(p.endswith("ok.") for p in passages)  # cut only at sentence ends
    assert " ".join(passages) == text.strip()
    assert split_passages("  short  ") == ["short"]
    # Abbreviations do not end sentences.
    abbrev = "Mr. Smith went to Washington. " * 20
    assert all(p.endswith("Washington.") for p in split_passages(abbrev, max_chars=100))


def test_split_passages_long_sentence_balanced():
    words = " ".join(f"word{i}" for i in range(120))  # one ~830-char sentence, no period
    pieces = split_passages(words, max_chars=500)
    assert len(pieces) == 2 and all(300 < len(p) <= 500 for p in pieces)
    assert " ".join(pieces) == words


@pytest.fixture(scope="module")
def corpus() -> list[TextRecord]:
    return builtin_corpus()


def test_builtin_corpus_size_and_sources(corpus):
    counts = Counter(r.source for r in corpus)
    assert set(counts) == set(SOURCES)
    assert 50_000 < len(corpus) < 200_000
    assert min(counts.values()) > 3_000
    assert all(0 < len(r.text) <= 500 and r.text == r.text.strip() for r in corpus)
    # Sources appear in SOURCES order (deterministic layout).
    order = list(dict.fromkeys(r.source for r in corpus))
    assert order == list(SOURCES)


def test_builtin_corpus_content(corpus):
    texts = {r.text for r in corpus}
    joined = "\n".join(r.text for r in corpus if r.source == "shakespeare")
    assert "To be, or not to be: that is the question:" in joined
    assert "**" not in joined and "_\\[" not in joined  # no speaker markup or stage directions
    assert not any("$FreeBSD$" in t for t in texts)
    sotu = [r.text for r in corpus if r.source == "sotu"]
    assert any("state of the Union" in t for t in sotu)


def test_builtin_corpus_deterministic_and_selectable(corpus):
    again = builtin_corpus()
    assert again == corpus and again is not corpus  # a copy: callers may mutate it
    facts = list(load_texts("builtin:randfacts"))
    assert facts == [r for r in corpus if r.source == "randfacts"]
    with pytest.raises(ValueError, match=r"unknown builtin source\(s\) \['poems'\]"):
        builtin_corpus(["poems"])
