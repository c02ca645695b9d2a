"""Text sources: where the passages that the pipeline reads come from.

``load_texts(source, ...)`` understands:

- ``"builtin"`` (or ``"builtin:sotu,shakespeare"``): the offline English corpus of ``saepipe.texts.corpus``.
- a local file, by extension (text files are decoded with ``encoding``, UTF-8 by default; a file that
  is not valid in it is an error naming the file, the byte and the ``prepare.encoding`` to set):
  ``.txt`` one passage per paragraph (paragraphs are separated by blank lines; line breaks inside a
  paragraph are kept); ``.jsonl`` one JSON object (or string) per line; ``.json`` a list of objects
  or strings, or an object of columns; ``.parquet`` / ``.csv`` a table. For objects and tables the
  text is read from ``text_column``.
- a local folder: one written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (read with ``load_from_disk``), or else any folder ``datasets.load_dataset`` accepts (e.g. parquet
  or jsonl data files; HF's rules apply there, e.g. its ``.txt`` reader gives one row per line).
- anything else: a Hugging Face hub dataset name, read with
  ``datasets.load_dataset(name, dataset_config, split=dataset_split, revision=dataset_revision)``.
  Without a network (``saepipe.runtime.network``) only the local cache is tried, with one warning, and
  a dataset that is not cached fails at once instead of after the hub client's retries.

Each passage is a ``TextRecord(text, source)``; ``source`` labels where it came from (builtin source
name, file name, or dataset name). Missing values (null) become empty strings, which prepare drops as
too short; non-string values are an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from saepipe.runtime.network import hub_unreachable
from saepipe.texts.corpus import builtin_corpus
from saepipe.texts.records import TextRecord

log = logging.getLogger(__name__)

FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet", ".csv")
"""Local file types ``load_texts`` reads directly."""

_BATCH_ROWS = 4096


def source_kind(source: str) -> str:
    """``"builtin"``, ``"local"`` (a file or folder, existing or not) or ``"hub"`` (a dataset name)."""
    source = str(source).strip()
    if source == "builtin" or source.startswith("builtin:"):
        return "builtin"
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        return "local"
    return "hub"


def load_texts(
    source: str,
    *,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    text_column: str = "text",
    dataset_revision: str | None = None,
    encoding: str = "utf-8",
) -> Iterator[TextRecord]:
    """Passages of ``source`` (see the module docstring for what ``source`` may be).

    A missing file, unknown column or split, or unreadable dataset raises here, before iteration;
    a bad row (invalid JSON line, non-string value, undecodable bytes) raises when it is reached.
    ``dataset_config``, ``dataset_split`` and ``dataset_revision`` apply to HF datasets only;
    ``text_column`` to tables, JSON objects and HF datasets; ``encoding`` to local text files.
    """
    source = str(source).strip()
    kind = source_kind(source)
    if kind == "builtin":
        names = [s.strip() for s in source.partition(":")[2].split(",") if s.strip()] or None
        return iter(builtin_corpus(names))
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path, text_column=text_column, encoding=encoding)
    if path.is_dir():
        return _read_hf_folder(path, dataset_config, dataset_split, text_column)
    if kind == "local":
        raise FileNotFoundError(f"text source not found: {source}")
    return _read_hf_hub(source, dataset_config, dataset_split, text_column, dataset_revision)


def read_text_file(path: str | Path, *, text_column: str = "text", encoding: str = "utf-8") -> Iterator[TextRecord]:
    """Passages of one local ``.txt/.jsonl/.json/.parquet/.csv`` file, labelled with its file name."""
    path = Path(path)
    readers = {
        ".txt": _txt_texts,
        ".jsonl": _jsonl_texts,
        ".json": _json_texts,
        ".parquet": _parquet_texts,
        ".csv": _csv_texts,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"unsupported text file type {path.suffix!r} ({path}); use one of {FILE_SUFFIXES}"
        )
    texts = reader(path, text_column, _python_encoding(encoding))
    return (TextRecord(t, path.name) for t in texts)


def _python_encoding(encoding: str) -> str:
    """``utf-8`` reads as ``utf-8-sig`` (a leading byte-order mark is skipped); others as given."""
    return "utf-8-sig" if encoding.strip().lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _read(path: Path, encoding: str) -> str:
    """The text of ``path``; bytes that are not valid in ``encoding`` are an error saying where and what to set."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise _decode_error(path, encoding, err) from err


def _decode_error(path: Path, encoding: str, err: UnicodeDecodeError | None) -> ValueError:
    where = ""
    if err is not None:
        where = f" (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    shown = "utf-8" if encoding == "utf-8-sig" else encoding
    return ValueError(
        f"{path} is not valid {shown} text{where}: set prepare.encoding to the file's encoding "
        "(often latin-1 or cp1252 for Western European text), or convert the file to UTF-8")


def _as_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{where} holds a {type(value).__name__}, expected a string")
    return value


def _txt_texts(path: Path, _column: str, encoding: str) -> list[str]:
    text = _read(path, encoding)
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _object_text(obj: Any, column: str, where: str) -> str:
    if isinstance(obj, str) or obj is None:
        return _as_text(obj, where)
    if not isinstance(obj, dict):
        raise TypeError(f"{where} is a {type(obj).__name__}; expected an object or a string")
    if column not in obj:
        raise KeyError(f"{where} has no text column {column!r}; available: {sorted(obj)}")
    return _as_text(obj[column], f"{where} column {column!r}")


def _jsonl_texts(path: Path, column: str, encoding: str) -> Iterator[str]:
    lines = _read(path, encoding).splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON ({e})") from e
        yield _object_text(obj, column, f"{path}:{i}")


def _json_texts(path: Path, column: str, encoding: str) -> Iterator[str]:
    try:
        data = json.loads(_read(path, encoding))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if isinstance(data, dict):  # column-oriented: {"text": [...], ...}
        if column not in data:
            raise KeyError(f"{path} has no text column {column!r}; available: {sorted(data)}")
        data = data[column]
        if not isinstance(data, list):
            raise TypeError(f"{path} column {column!r} is a {type(data).__name__}, expected a list")
        return (_as_text(v, f"{path}[{column!r}][{i}]") for i, v in enumerate(data))
    if not isinstance(data, list):
        raise TypeError(
            f"{path} holds a {type(data).__name__}; expected a list or an object of columns"
        )
    return (_object_text(obj, column, f"{path}[{i}]") for i, obj in enumerate(data))


def _check_arrow_column(schema: Any, column: str, where: Path | str) -> None:
    if column not in schema.names:
        raise KeyError(f"{where} has no text column {column!r}; available: {schema.names}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise TypeError(f"{where} column {column!r} has type {kind}, expected strings")


def _arrow_batches_texts(batches: Iterable[Any]) -> Iterator[str]:
    for batch in batches:
        for value in batch.to_pylist():
            yield "" if value is None else value


def _parquet_texts(path: Path, column: str, _encoding: str) -> Iterator[str]:
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e})") from e
    _check_arrow_column(reader.schema_arrow, column, path)
    batches = (b.column(0) for b in reader.iter_batches(batch_size=_BATCH_ROWS, columns=[column]))
    return _arrow_batches_texts(batches)


def _csv_texts(path: Path, column: str, encoding: str) -> Iterator[str]:
    options = pcsv.ConvertOptions(column_types={column: pa.string()}, strings_can_be_null=False)
    read = pcsv.ReadOptions(encoding="utf8" if encoding == "utf-8-sig" else encoding)
    try:
        table = pcsv.read_csv(path, read_options=read, convert_options=options,
                              parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except pa.ArrowInvalid as e:
        if "UTF8" in str(e) or "utf-8" in str(e).lower():
            raise _decode_error(path, encoding, None) from e
        raise ValueError(f"{path} is not a readable CSV file ({e})") from e
    _check_arrow_column(table.schema, column, path)
    return _arrow_batches_texts(table.column(column).chunks)


def _dataset_texts(ds: Any, column: str, label: str, where: str) -> Iterator[TextRecord]:
    """Records of one HF ``Dataset``; the column is checked now, rows are read lazily in batches."""
    if column not in ds.column_names:
        raise KeyError(f"{where} has no text column {column!r}; available: {ds.column_names}")
    _check_arrow_column(ds.data.schema, column, where)
    ds = ds.select_columns([column])
    batches = (batch[column] for batch in ds.iter(batch_size=_BATCH_ROWS))
    return (TextRecord("" if t is None else t, label) for rows in batches for t in rows)


def _pick_split(data: Any, split: str, where: str) -> Any:
    """The ``split`` of a ``DatasetDict`` (a plain ``Dataset`` is returned as is)."""
    import datasets  # lazy: seconds to import, and only Hugging Face sources need it

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise KeyError(f"{where} has no split {split!r}; available: {list(data)}")
        return data[split]
    return data


def _read_hf_folder(
    path: Path, config: str | None, split: str, column: str
) -> Iterator[TextRecord]:
    import datasets  # lazy: seconds to import, and only Hugging Face sources need it

    saved = any((path / f).exists() for f in ("dataset_dict.json", "state.json"))
    if saved:
        data = datasets.load_from_disk(str(path))
    else:
        try:
            data = datasets.load_dataset(str(path), config, split=split)
        except ValueError as e:
            raise ValueError(f"datasets.load_dataset could not read folder {path}: {e}") from e
    return _dataset_texts(_pick_split(data, split, str(path)), column, path.name, str(path))


def _hub_where(name: str, config: str | None, split: str, revision: str | None = None) -> str:
    parts = ([f"config {config!r}"] if config else []) + [f"split {split!r}"]
    if revision:
        parts.append(f"revision {revision!r}")
    return f"dataset {name!r} ({', '.join(parts)})"


def use_local_hub_cache_only() -> None:
    """Make ``huggingface_hub`` and ``datasets`` read their caches without asking the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when they are imported
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # already imported: the constant was read, set it too
            setattr(sys.modules[module], attr, True)


def resolve_dataset_revision(name: str, revision: str | None = None) -> str | None:
    """The commit sha a hub dataset's ``revision`` (None: the current one) points to, or ``revision``
    itself when the hub is unreachable (a cached copy is used then; warned once)."""
    reason = hub_unreachable()
    if reason is not None:
        log.warning("the Hugging Face hub is unreachable (%s): reading dataset %r from the local cache only "
                    "(revision %s)", reason, name, revision or "not pinned: whatever is cached")
        return revision
    from huggingface_hub import HfApi  # lazy: only hub datasets need it

    try:
        return HfApi().dataset_info(name, revision=revision, timeout=30).sha
    except Exception as e:  # unknown name or revision, auth, network
        raise RuntimeError(f"could not resolve dataset {name!r} at revision {revision or 'main'} on the "
                           f"Hugging Face hub: {e}") from e


def _read_hf_hub(name: str, config: str | None, split: str, column: str,
                 revision: str | None = None) -> Iterator[TextRecord]:
    import datasets  # lazy: seconds to import, and only Hugging Face sources need it

    where = _hub_where(name, config, split, revision)
    reason = hub_unreachable()
    if reason is not None:
        use_local_hub_cache_only()
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # network, auth, unknown name/config/split: say which source failed
        if reason is not None:
            raise RuntimeError(
                f"could not load {where}: the Hugging Face hub is unreachable ({reason}) and the dataset is "
                "not in the local cache; connect once to download it, or put the texts in a file under "
                f"data/sources/ ({type(e).__name__}: {e})") from e
        raise RuntimeError(f"could not load {where} with datasets.load_dataset: {e}") from e
    label = name if not config else f"{name}/{config}"
    return _dataset_texts(ds, column, label, where)


__all__ = ["FILE_SUFFIXES", "TextRecord", "load_texts", "read_text_file", "resolve_dataset_revision", "source_kind",
           "use_local_hub_cache_only"]
