"""The texts of a dataset as the Python API takes it: a list of strings (or of dicts), or a Hugging
Face ``datasets.Dataset``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def dataset_texts(dataset: Any, text_column: str = "text") -> list[str]:
    """The texts of ``dataset``: a list/iterable of strings (or of dicts with ``text_column``),
    or a Hugging Face ``datasets.Dataset``. Errors name what was wrong; an empty dataset is an error."""
    if isinstance(dataset, (str, bytes, Path)):
        raise TypeError("dataset must be a list of strings or a datasets.Dataset, not a single "
                        f"{type(dataset).__name__}; wrap one text in a list, or read a file with "
                        "saepipe.texts.sources.load_texts")
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a datasets.DatasetDict
        raise TypeError(f"dataset is a DatasetDict with splits {sorted(columns)}; pick one, "
                        "e.g. dataset['train']")
    if isinstance(columns, list) and hasattr(dataset, "select_columns"):  # a datasets.Dataset
        if text_column not in columns:
            raise ValueError(f"dataset has no column {text_column!r}; its columns are {columns} "
                             "(pass text_column=...)")
        dataset = dataset[text_column]
    if not isinstance(dataset, Iterable):
        raise TypeError(f"dataset must be a list of strings or a datasets.Dataset, not {type(dataset).__name__}")
    texts = []
    for i, item in enumerate(dataset):
        if isinstance(item, dict):
            if text_column not in item:
                raise ValueError(f"dataset item {i} has no key {text_column!r} (keys: {sorted(item)})")
            item = item[text_column]
        if not isinstance(item, str):
            raise TypeError(f"dataset item {i} is a {type(item).__name__}, expected a string")
        texts.append(item)
    if not texts:
        raise ValueError("dataset is empty: at least one text is needed")
    if not any(t.strip() for t in texts):
        raise ValueError(f"all {len(texts)} texts of the dataset are empty or whitespace")
    return texts


__all__ = ["dataset_texts"]
