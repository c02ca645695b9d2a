"""The prepare stage's library: clean, filter, dedupe, sample and split texts; write Parquet + counts.

Steps, in order (each text once, so the work is linear in the number of texts):

1. strip surrounding whitespace; drop texts shorter than ``min_chars`` (``too_short``);
2. truncate texts longer than ``max_chars``: cut after the last sentence end (``.!?`` before a space)
   that keeps at least ``max(min_chars, max_chars // 2)`` characters, else at the last whitespace
   past that point, else hard at ``max_chars`` (``truncated`` counts them; they are kept);
3. drop exact duplicates of an earlier kept text, compared after truncation (``duplicate``);
4. if more than ``max_texts`` remain, keep a uniform random sample of ``max_texts`` drawn with
   ``seed`` (a seeded permutation), in their original order (``over_max_texts``);
5. split: the ``round(n * eval_fraction)`` texts with the smallest ``blake2b(seed, text)`` score go to
   ``eval`` (at least 1 and at most n-1 when ``eval_fraction > 0`` and n >= 2). A text's score depends
   only on its content and the seed, so the split is stable across runs and machines.

Output table columns: ``id`` (int64, 0..n-1 in output order), ``text``, ``source``, ``split``
(``"train"`` | ``"eval"``), all strings but ``id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from saepipe.runtime.files import atomic_write, atomic_write_text, file_sha256
from saepipe.texts.config import PrepareConfig
from saepipe.texts.records import TextRecord
from saepipe.texts.sources import load_texts, resolve_dataset_revision, source_kind

log = logging.getLogger(__name__)

TEXTS_FILE = "texts.parquet"
"""File name of the prepared texts inside the stage's output folder."""

COUNTS_FILE = "counts.json"
"""File name of the counts (a DVC metrics file) inside the stage's output folder."""

SCHEMA = pa.schema(
    [("id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("split", pa.string())]
)
"""Schema of ``texts.parquet``."""

SPLITS: tuple[str, ...] = ("train", "eval")
"""Values of the ``split`` column: texts to extract training activations from, and held-out texts."""


@dataclass
class PrepareCounts:
    """What happened to the texts read (written as counts.json, a DVC metrics file)."""

    read: int = 0
    """Texts read from the source."""
    kept: int = 0
    """Texts written (train + eval)."""
    too_short: int = 0
    """Dropped: shorter than min_chars after stripping."""
    duplicate: int = 0
    """Dropped: exact duplicate of an earlier text (after truncation)."""
    over_max_texts: int = 0
    """Dropped: not drawn in the max_texts sample."""
    truncated: int = 0
    """Kept but cut to max_chars."""
    train: int = 0
    """Texts in the train split."""
    eval: int = 0
    """Texts in the eval split."""
    kept_by_source: dict[str, int] = field(default_factory=dict)
    """Kept texts per source label."""
    dataset_revision: str | None = None
    """Commit sha of the hub dataset read (None for other sources, or when the hub was unreachable)."""
    texts_sha256: str | None = None
    """sha256 of the texts.parquet written: extract and evaluate check the file they read against it."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


class PrepareResult(NamedTuple):
    """The prepared texts (``SCHEMA``) and the counts of what was kept and dropped."""

    table: pa.Table
    counts: PrepareCounts


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")


def truncate_text(text: str, max_chars: int, min_chars: int = 0) -> str:
    """Cut ``text`` to at most ``max_chars``, preferring a sentence end, then a word boundary.

    A boundary is used only if it keeps at least ``max(min_chars, max_chars // 2)`` characters.
    """
    if len(text) <= max_chars:
        return text
    floor = max(min_chars, max_chars // 2)
    head = text[: max_chars + 1]  # one more char: the boundary may sit just past max_chars
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if floor <= m.end() <= max_chars]
    if ends:
        return head[: ends[-1]]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    if space >= floor:
        return head[:space].rstrip()
    return text[:max_chars]


def _split_score(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "little")


def assign_splits(texts: list[str], eval_fraction: float, seed: int) -> list[str]:
    """``"train"``/``"eval"`` for each text: the lowest-scoring ``round(n * eval_fraction)`` go to eval.

    Never an empty eval (or train) split when ``eval_fraction > 0`` and there are at least 2 texts.
    """
    n = len(texts)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    elif eval_fraction > 0:
        log.warning("only %d text: the eval split is empty", n)
    scores = np.fromiter((_split_score(t, seed) for t in texts), dtype=np.uint64, count=n)
    splits = np.full(n, "train", dtype=object)
    splits[np.argsort(scores, kind="stable")[:n_eval]] = "eval"
    return splits.tolist()


def _clean_dedupe(
    records: Iterable[TextRecord], min_chars: int, max_chars: int, counts: PrepareCounts
) -> list[TextRecord]:
    """Steps 1-3: strip, drop short, truncate, drop exact duplicates (keeping the first)."""
    kept: list[TextRecord] = []
    seen: set[str] = set()
    for text, source in tqdm(records, desc="prepare", unit=" texts", disable=None):
        counts.read += 1
        text = text.strip()
        if len(text) < min_chars:
            counts.too_short += 1
            continue
        if len(text) > max_chars:
            text = truncate_text(text, max_chars, min_chars)
            counts.truncated += 1
        if text in seen:
            counts.duplicate += 1
            continue
        seen.add(text)
        kept.append(TextRecord(text, source))
    return kept


def _empty_error(counts: PrepareCounts, min_chars: int) -> ValueError:
    if counts.read == 0:
        return ValueError("the text source yielded no texts")
    return ValueError(
        f"all {counts.read} texts are shorter than min_chars={min_chars} (after stripping whitespace); "
        "nothing left to prepare"
    )


def prepare_texts(
    records: Iterable[TextRecord],
    *,
    min_chars: int,
    max_chars: int,
    max_texts: int | None,
    eval_fraction: float,
    seed: int,
) -> PrepareResult:
    """Clean, filter, dedupe, sample and split ``records`` (see the module docstring for the rules).

    Raises a ValueError naming the filter that removed everything when no text is left.
    """
    checked = PrepareConfig(min_chars=min_chars, max_chars=max_chars, max_texts=max_texts,
                            eval_fraction=eval_fraction, seed=seed)  # ParamsError naming a bad one
    min_chars, max_chars, max_texts = checked.min_chars, checked.max_chars, checked.max_texts
    eval_fraction, seed = checked.eval_fraction, checked.seed
    counts = PrepareCounts()
    kept = _clean_dedupe(records, min_chars, max_chars, counts)
    if not kept:
        raise _empty_error(counts, min_chars)
    if max_texts is not None and len(kept) > max_texts:
        chosen = np.sort(np.random.default_rng(seed).permutation(len(kept))[:max_texts])
        counts.over_max_texts = len(kept) - max_texts
        kept = [kept[i] for i in chosen]
    texts = [r.text for r in kept]
    splits = assign_splits(texts, eval_fraction, seed)
    counts.kept = len(kept)
    counts.eval = splits.count("eval")
    counts.train = counts.kept - counts.eval
    counts.kept_by_source = dict(sorted(Counter(r.source for r in kept).items()))
    table = prepared_table(texts, [r.source for r in kept], splits)
    log.info("prepare: %s", json.dumps(counts.to_dict()))
    return PrepareResult(table, counts)


def prepared_table(texts: list[str], sources: list[str], splits: list[str]) -> pa.Table:
    """The ``texts.parquet`` table (``SCHEMA``): ids 0..n-1 in order, texts, source labels, splits."""
    return pa.table(
        {
            "id": pa.array(np.arange(len(texts), dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
            "source": pa.array(sources, pa.string()),
            "split": pa.array(splits, pa.string()),
        },
        schema=SCHEMA,
    )


def run_prepare(params: PrepareConfig) -> PrepareResult:
    """Load the texts of ``params.source`` and prepare them; a hub dataset's revision is resolved to a
    commit sha first (and recorded in the counts), so the texts read are the ones recorded."""
    revision = params.dataset_revision
    if source_kind(params.source) == "hub":
        revision = resolve_dataset_revision(params.source, revision)
    records = load_texts(
        params.source,
        dataset_config=params.dataset_config,
        dataset_split=params.dataset_split,
        text_column=params.text_column,
        dataset_revision=revision,
        encoding=params.encoding,
    )
    result = prepare_texts(records, **params.prepare_kwargs())
    result.counts.dataset_revision = revision if source_kind(params.source) == "hub" else None
    return result


def write_prepared(result: PrepareResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``texts.parquet`` and ``counts.json`` (with the parquet's sha256) into ``out_dir``
    atomically; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts_path, counts_path = out_dir / TEXTS_FILE, out_dir / COUNTS_FILE
    atomic_write(texts_path, lambda tmp: pq.write_table(result.table, tmp))
    result.counts.texts_sha256 = file_sha256(texts_path)
    atomic_write_text(counts_path, json.dumps(result.counts.to_dict(), indent=2) + "\n")
    return texts_path, counts_path


def verify_prepared(texts_path: str | Path) -> None:
    """Check ``texts.parquet`` against the sha256 that prepare recorded in the ``counts.json`` beside it
    (when there is one): a file changed or damaged since is an error saying to rerun prepare."""
    texts_path = Path(texts_path)
    counts = texts_path.with_name(COUNTS_FILE)
    if not counts.is_file():
        return
    try:
        want = json.loads(counts.read_text()).get("texts_sha256")
    except (ValueError, AttributeError):
        raise ValueError(f"{counts} is not valid JSON: rerun prepare") from None
    if want and file_sha256(texts_path) != want:
        raise ValueError(f"{texts_path} does not match the sha256 recorded in {counts} (changed or damaged "
                         "since prepare wrote it): rerun prepare")


def check_split(split: str) -> str:
    """``split`` itself when it is one of ``SPLITS``; otherwise a ValueError naming the valid ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return split


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file; an unreadable one (truncated, not Parquet) or one without ``columns`` is an
    error naming it."""
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns or () if c not in names]
        if not missing:
            return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read {path} ({e}): the file is damaged or not prepare's output; "
                         "rerun prepare") from e
    raise ValueError(f"{path} has no column(s) {missing} (it has {names}): not prepare's output; rerun prepare")


def read_prepared(path: str | Path, split: str | None = None) -> pa.Table:
    """Read ``texts.parquet`` (a file, or the prepare output folder), optionally one split only."""
    path = Path(path)
    if path.is_dir():
        path = path / TEXTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"prepared texts not found: {path} (run the prepare stage)")
    if split is not None:
        check_split(split)
    table = _read_table(path)
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is missing columns {sorted(missing)}; expected {SCHEMA.names}")
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table


def read_split(texts_path: str | Path, split: str) -> tuple[np.ndarray, list[str]]:
    """The (ids, texts) of one split of ``texts.parquet``, in file order (the order extract reads)."""
    check_split(split)
    texts_path = Path(texts_path)
    if not texts_path.is_file():
        raise FileNotFoundError(f"prepared texts not found: {texts_path} (run the prepare stage)")
    table = _read_table(texts_path, columns=["id", "text", "split"])
    mask = np.asarray(table.column("split").to_numpy(zero_copy_only=False) == split)
    ids = table.column("id").to_numpy()[mask].astype(np.int64)
    texts = [t for t, m in zip(table.column("text").to_pylist(), mask, strict=True) if m]
    if not texts:
        raise ValueError(f"{texts_path} has no texts in split {split!r}")
    return ids, texts
