"""Reading ``params.yaml``: the one place stages get their settings from, and where they are checked.

Each section of the file (``prepare:``, ``extract:``, ``sae:``, ...) maps onto a frozen dataclass
of the layer that uses it; ``ParamsSection`` gives those dataclasses one way to be built from a
section (``from_dict``: unknown keys are an error naming them, they are usually typos), written back
(``to_dict``) and validated: each section lists a ``Rule`` for every field in ``RULES`` (type and
range, in one place), and ``__post_init__`` applies them whether the config comes from params.yaml
or from Python. A bad value raises ``ParamsError`` (a ``ValueError``) naming ``section.key``, the
value and what is valid.

YAML mangles a few values in ways a user does not see, so rules coerce those with a warning instead
of failing later with an unrelated error: ``3e-4`` (YAML 1.1 reads a float without a dot as a
string) becomes 0.0003, ``"6"`` for an integer becomes 6, ``"false"``/``"true"`` for a boolean
become False/True (a non-empty string is otherwise truthy: ``"false"`` would have meant True).
"""

from __future__ import annotations

import dataclasses
import difflib
import encodings
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

log = logging.getLogger(__name__)

DEFAULT_PARAMS_FILE = "params.yaml"

DEFAULT_MODEL = "default"
"""The model when params.yaml names none: SmolLM2-135M-Instruct, shipped on PyPI."""


class ParamsError(ValueError):
    """A setting (a params.yaml key or a config argument) with a value that is not valid.

    ``key`` is ``section.key`` (e.g. ``sae.learning_rate``), ``value`` the value given and
    ``expected`` what would be valid; the message says all three.
    """

    def __init__(self, key: str, value: Any, expected: str, hint: str = "", *, message: str | None = None) -> None:
        self.key, self.value, self.expected = key, value, expected
        message = message or f"{key} must be {expected}, got {_shown(value)}"
        super().__init__(message + (f"; {hint}" if hint else ""))


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", str: "a string", int: "an integer", float: "a number",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if value is None else f"{text} ({kind})"


def note(key: str, value: Any, result: Any, why: str) -> None:
    """Say (a warning) that ``key``'s ``value`` was read as ``result``, and why."""
    log.warning("%s: %r read as %r (%s)", key, value, result, why)


# --------------------------------------------------------------------------------------------------
# Rules: one per field, each checks (and where YAML mangles it, coerces) one value
# --------------------------------------------------------------------------------------------------
class Rule:
    """How one field is checked: ``check(key, value)`` returns the value to use or raises ParamsError."""

    optional: bool = False

    def describe(self) -> str:
        """What is valid, as the end of "``key`` must be ..."."""
        raise NotImplementedError

    def check(self, key: str, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise ParamsError(key, value, self.describe())
        return self.check_value(key, value)

    def check_value(self, key: str, value: Any) -> Any:
        raise NotImplementedError

    def _or_null(self, text: str) -> str:
        return f"{text} or null" if self.optional else text


def _range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


@dataclasses.dataclass(frozen=True)
class Int(Rule):
    """An integer in [min, max] (either bound optional)."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def describe(self) -> str:
        bounds = _range_text(self.min, self.max)
        return self._or_null("an integer" + (f" {bounds}" if bounds else ""))

    def check_value(self, key: str, value: Any) -> int:
        if isinstance(value, bool):
            raise ParamsError(key, value, self.describe())
        result: int | None = None
        if isinstance(value, int):
            result = value
        elif isinstance(value, float) and value.is_integer():
            result = int(value)
            note(key, value, result, "an integer was written as a float")
        elif isinstance(value, str):
            result = _parse_int(value)
            if result is not None:
                note(key, value, result, "a quoted number is a string in YAML; write it without quotes")
        if result is None:
            raise ParamsError(key, value, self.describe())
        if (self.min is not None and result < self.min) or (self.max is not None and result > self.max):
            raise ParamsError(key, value, self.describe())
        return result


def _parse_int(text: str) -> int | None:
    text = text.strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)  # "1e6": YAML 1.1 reads a float without a dot as a string
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


@dataclasses.dataclass(frozen=True)
class Float(Rule):
    """A finite number in a range; ``min_open``/``max_open`` exclude the bound itself."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        bounds = _range_text(self.min, self.max, self.min_open, self.max_open)
        return self._or_null("a finite number" + (f" {bounds}" if bounds else ""))

    def check_value(self, key: str, value: Any) -> float:
        if isinstance(value, bool):
            raise ParamsError(key, value, self.describe())
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip().replace("_", ""))
            except ValueError:
                raise ParamsError(key, value, self.describe()) from None
            note(key, value, result, "YAML reads a number without a dot, such as 3e-4, as a string: "
                                     "write 3.0e-4 or 0.0003")
        else:
            raise ParamsError(key, value, self.describe())
        if not math.isfinite(result):
            raise ParamsError(key, value, self.describe())
        low_bad = self.min is not None and (result <= self.min if self.min_open else result < self.min)
        high_bad = self.max is not None and (result >= self.max if self.max_open else result > self.max)
        if low_bad or high_bad:
            raise ParamsError(key, value, self.describe())
        return result


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Bool(Rule):
    """true or false; the strings "true"/"false" (yes/no, on/off) are read as such, with a warning."""

    optional: bool = False

    def describe(self) -> str:
        return self._or_null("true or false")

    def check_value(self, key: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            result = value.strip().lower() in _TRUE
            note(key, value, result, "a quoted boolean is a string in YAML; write true or false without quotes")
            return result
        raise ParamsError(key, value, self.describe())


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a few strings (another case is accepted with a warning)."""

    options: tuple[str, ...] = ()
    optional: bool = False

    def describe(self) -> str:
        return self._or_null("one of " + ", ".join(self.options))

    def check_value(self, key: str, value: Any) -> str:
        if isinstance(value, str):
            if value in self.options:
                return value
            folded = {o.lower(): o for o in self.options}.get(value.strip().lower())
            if folded is not None:
                note(key, value, folded, "options are case-sensitive")
                return folded
        raise ParamsError(key, value, self.describe())


@dataclasses.dataclass(frozen=True)
class Str(Rule):
    """A non-empty string (a number is read as its text, with a warning)."""

    optional: bool = False

    def describe(self) -> str:
        return self._or_null("a non-empty string")

    def check_value(self, key: str, value: Any) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            result = str(value)
            note(key, value, result, "a number where a name is expected; quote it to keep it a string")
            return result
        if not isinstance(value, str) or not value.strip():
            raise ParamsError(key, value, self.describe())
        return value


@dataclasses.dataclass(frozen=True)
class Encoding(Str):
    """The name of a text encoding Python knows (utf-8, latin-1, cp1252, ...)."""

    def describe(self) -> str:
        return self._or_null("a text encoding Python knows (utf-8, latin-1, cp1252, utf-16, ...)")

    def check_value(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ParamsError(key, value, self.describe())
        # the standard library's table, not codecs.lookup: an installed package can register a search
        # function that answers every name (future_typing does)
        info = encodings.search_function(value.strip().lower())
        if info is None or not getattr(info, "_is_text_encoding", True):
            raise ParamsError(key, value, self.describe())
        return value


@dataclasses.dataclass(frozen=True)
class StrList(Rule):
    """A list of strings, kept as a tuple (a single string becomes a list of one, with a warning);
    optionally of ``options`` only, at least ``min_items`` long, without repeats (``unique``)."""

    options: tuple[str, ...] | None = None
    min_items: int = 0
    unique: bool = False
    optional: bool = False

    def describe(self) -> str:
        what = "a list of " + ("strings" if self.options is None else "names from " + ", ".join(self.options))
        if self.min_items:
            what = f"a list of at least {self.min_items} " + what.removeprefix("a list of ")
        return what + (", each once" if self.unique else "")

    def check(self, key: str, value: Any) -> tuple[str, ...]:
        if value is None and not self.min_items:
            return ()
        if isinstance(value, str):
            note(key, value, [value], "a single string where a list is expected")
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ParamsError(key, value, self.describe())
        if (len(value) < self.min_items or (self.options is not None and not set(value) <= set(self.options))
                or (self.unique and len(set(value)) != len(value))):
            raise ParamsError(key, value, self.describe())
        return tuple(value)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
class ParamsSection:
    """Mixin for a frozen dataclass that is one section of ``params.yaml`` (field = key).

    Subclasses set ``SECTION`` (the section's name) and ``RULES`` (a ``Rule`` for every field), and
    may override ``check_together`` for conditions between fields. Construction validates: a bad
    value raises ``ParamsError`` naming ``section.key``.
    """

    SECTION: ClassVar[str]
    RULES: ClassVar[Mapping[str, Rule]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            rule = self.RULES.get(f.name)
            if rule is None:  # a programming error: tests/test_params.py checks every section
                raise TypeError(f"{type(self).__name__}.RULES has no rule for field {f.name!r}")
            value = getattr(self, f.name)
            checked = rule.check(self.key(f.name), value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.check_together()

    def check_together(self) -> None:
        """Conditions between fields (override); raise ``ParamsError`` naming the key to change."""

    @classmethod
    def key(cls, name: str) -> str:
        """``section.name``: how errors and warnings name a field."""
        return f"{cls.SECTION}.{name}"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Self:
        """Build from a params section (None: all defaults); unknown keys are an error naming them."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ParamsError(cls.SECTION, values, f"a mapping of {cls.SECTION} settings (key: value lines)")
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), cls.SECTION)  # type: ignore[arg-type]
        return cls(**{str(k): v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The section as plain values (what ``params.yaml`` would hold)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


def check_known_keys(values: Mapping[str, Any], known: Iterable[str], section_name: str) -> None:
    """Raise a ParamsError naming every key of ``values`` that is not in ``known`` (and a close match)."""
    known = sorted(known)
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hints = [f"{section_name}.{m[0]} for {u}" for u, m in close.items() if m]
        names = ", ".join(f"{section_name}.{u}" for u in unknown)
        raise ParamsError(f"{section_name}.{unknown[0]}", unknown, f"one of: {', '.join(known)}",
                          ("did you mean " + ", ".join(hints)) if hints else "",
                          message=f"unknown key(s) in {section_name} params: {names}; valid: {', '.join(known)}")


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------
def read_params(path: str | Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a mapping of sections; not YAML or not a mapping is a ParamsError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(str(path), "(unparsable)", "valid YAML", str(err).replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ParamsError(str(path), data, "a mapping of sections (prepare:, extract:, sae:, ...)")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of params (e.g. ``prepare``); missing or empty means every default."""
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamsError(name, value, f"a mapping of {name} settings (key: value lines)")
    return dict(value)


MODEL_RULE = Str()


def model_spec(params: dict[str, Any]) -> str:
    """The ``model:`` of params (a name, hub id, folder or .gguf file; see ``saepipe.lm.model``)."""
    return MODEL_RULE.check("model", params.get("model", DEFAULT_MODEL))


def model_kind(spec: str) -> str:
    """``"default"``, ``"local"`` (a .gguf file or a folder, existing or not) or ``"hub"`` (an
    ``org/name`` id), as ``saepipe.lm.model.load_model`` reads ``spec``."""
    if spec == DEFAULT_MODEL:
        return "default"
    path = Path(spec).expanduser()
    if path.exists() or path.suffix.lower() == ".gguf" or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return "local"
    return "hub"


__all__ = ["DEFAULT_MODEL", "DEFAULT_PARAMS_FILE", "MODEL_RULE", "Bool", "Choice", "Encoding", "Float", "Int",
           "ParamsError", "ParamsSection", "Rule", "Str", "StrList", "check_known_keys", "model_kind", "model_spec", "note",
           "read_params", "section"]
