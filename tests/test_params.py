"""Every params.yaml section validates every key (type and range) with the project's ``ParamsError``.

Property-based (hypothesis): for every section, valid values (including the forms YAML mangles, such
as ``"3e-4"`` or ``"6"``) construct; one invalid value raises ``ParamsError`` naming ``section.key``;
any junk at all (nested lists, mappings, booleans, text) either constructs or raises ``ParamsError``
naming the key, never another exception.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saepipe.cli import SECTIONS
from saepipe.lm.sites import COMPONENTS, SiteIds
from saepipe.runtime.params import (
    Bool,
    Choice,
    Encoding,
    Float,
    Int,
    ParamsError,
    Rule,
    Str,
    StrList,
    model_spec,
    read_params,
    section,
)
from saepipe.sae.config import SAEConfig, Variants

ANY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------ strategies from the rules
def valid_values(rule: Rule) -> st.SearchStrategy:
    """Values a rule accepts, including the mangled forms it coerces."""
    if isinstance(rule, Int):
        low = rule.min if rule.min is not None else -(10**9)
        high = rule.max if rule.max is not None else low + 10**9
        ints = st.integers(low, high)
        strategy = st.one_of(ints, ints.map(str), ints.map(float))
    elif isinstance(rule, Float):
        low = rule.min if rule.min is not None else -1e6
        high = rule.max if rule.max is not None else 1e6
        floats = st.floats(low, high, exclude_min=rule.min_open, exclude_max=rule.max_open,
                           allow_nan=False, allow_infinity=False)
        strategy = st.one_of(floats, floats.map(repr))
    elif isinstance(rule, Bool):
        strategy = st.one_of(st.booleans(), st.sampled_from(["true", "false", "True", "FALSE", "yes", "no"]))
    elif isinstance(rule, Choice):
        strategy = st.sampled_from(rule.options)
    elif isinstance(rule, Encoding):
        strategy = st.sampled_from(["utf-8", "latin-1", "cp1252", "utf-16", "UTF-8"])
    elif isinstance(rule, Str):
        strategy = st.text(min_size=1, max_size=20).filter(str.strip)
    elif isinstance(rule, StrList) and rule.options is not None:
        strategy = st.lists(st.sampled_from(rule.options), min_size=max(1, rule.min_items), unique=rule.unique,
                            max_size=len(rule.options))
    elif isinstance(rule, StrList):
        strategy = st.lists(st.text(max_size=8), min_size=rule.min_items, max_size=3)
    elif isinstance(rule, SiteIds):
        ids = st.builds(lambda layer, c: f"{layer}.{c}", st.integers(0, 40), st.sampled_from(COMPONENTS))
        strategy = st.lists(ids, min_size=1, max_size=4, unique=True)
    elif isinstance(rule, Variants):
        rate = st.one_of(st.floats(1e-5, 1e-2), st.none())  # null: the width's default (optional Floats)
        overrides = st.fixed_dictionaries({}, optional={"k": st.integers(1, 64), "learning_rate": rate,
                                                        "encoder_init_scale": rate,
                                                        "lr_decay": st.sampled_from(["cosine", "constant"])})
        strategy = st.dictionaries(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), overrides, min_size=1,
                                   max_size=3)
    else:
        raise AssertionError(f"no strategy for {rule!r}")
    return st.one_of(strategy, st.none()) if rule.optional else strategy


def invalid_values(rule: Rule) -> st.SearchStrategy:
    """Values a rule must reject."""
    containers = st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                         st.integers(), min_size=1))
    words = st.text(alphabet="abcxyz", min_size=1, max_size=6)
    none = st.nothing() if rule.optional else st.none()
    if isinstance(rule, Int):
        outside = []
        if rule.min is not None:
            outside.append(st.integers(max_value=rule.min - 1))
        if rule.max is not None:
            outside.append(st.integers(min_value=rule.max + 1))
        fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
        return st.one_of(st.booleans(), fractions, st.just(math.nan), words, containers, none, *outside)
    if isinstance(rule, Float):
        outside = [st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf"])]
        if rule.min is not None:
            outside.append(st.floats(max_value=rule.min, exclude_max=not rule.min_open, allow_nan=False,
                                     allow_infinity=False))
        if rule.max is not None:
            outside.append(st.floats(min_value=rule.max, exclude_min=not rule.max_open, allow_nan=False,
                                     allow_infinity=False))
        return st.one_of(st.booleans(), words, containers, none, *outside)
    if isinstance(rule, Bool):
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.sampled_from(["maybe", "1", "t", ""]),
                         containers, none)
    if isinstance(rule, Choice):
        lowered = {o.lower() for o in rule.options}
        return st.one_of(words.filter(lambda w: w.strip().lower() not in lowered), st.integers(), st.booleans(),
                         containers, none)
    if isinstance(rule, Encoding):
        return st.one_of(st.sampled_from(["nope", "utf-9", "base64", "rot13", "", " "]), st.booleans(),
                         containers, none)
    if isinstance(rule, Str):
        return st.one_of(st.sampled_from(["", "   ", "\n"]), st.booleans(), containers, none)
    if isinstance(rule, StrList):
        bad = [st.integers(), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), min_size=1),
               st.lists(st.integers(), min_size=1, max_size=3)]
        if rule.options is not None:
            bad.append(st.lists(words.filter(lambda w: w not in rule.options), min_size=1, max_size=2))
        if rule.unique and rule.options:
            bad.append(st.sampled_from(rule.options).map(lambda o: [o, o]))
        if rule.min_items:
            bad.extend([st.just([]), st.none()])
        return st.one_of(*bad)
    if isinstance(rule, SiteIds):
        return st.one_of(st.sampled_from(["6.mlp", "6-mlp", "6.resid", "x.mlp", "06.mlp"]), st.just([]),
                         st.just(["6.mlp", "6.mlp"]), st.lists(words, min_size=1, max_size=2), st.integers(),
                         st.booleans(), none)
    if isinstance(rule, Variants):
        return st.one_of(st.just({}), st.just({"a-b": {}}), st.just({"v": {"kk": 1}}), st.just({"v": {"k": 0}}),
                         st.just({"v": [1]}), st.lists(st.integers(), min_size=1, max_size=2), st.integers(),
                         words, none)
    raise AssertionError(f"no strategy for {rule!r}")


JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def valid_section(draw, cls) -> dict:
    """Some of a section's keys with valid values (conditions between keys respected)."""
    names = [f.name for f in dataclasses.fields(cls)]
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    values = {name: draw(valid_values(cls.RULES[name])) for name in chosen}
    if cls.SECTION == "prepare":  # max_chars >= min_chars
        low = int(float(values.get("min_chars", 50)))
        high = int(float(values.get("max_chars", 512)))
        if high < low:
            values["max_chars"] = low + draw(st.integers(0, 100))
            values["min_chars"] = low
    return values


SECTION_CLASSES = list(SECTIONS.values())


# ------------------------------------------------------------------------------------------ tests
def test_extract_components_are_the_model_code_s():
    from saepipe.activations.config import COMPONENTS
    from saepipe.lm.sites import COMPONENTS as SITE_COMPONENTS

    assert COMPONENTS == SITE_COMPONENTS


def test_every_field_of_every_section_has_a_rule():
    for cls in SECTION_CLASSES:
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.RULES) == fields, f"{cls.__name__}: RULES and fields differ"
        cls()  # the defaults are valid


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.SECTION)
@ANY_SETTINGS
@given(data=st.data())
def test_valid_values_construct_and_round_trip(cls, data):
    values = data.draw(valid_section(cls))
    config = cls.from_dict(values)
    assert cls.from_dict(config.to_dict()) == config  # checked values are stable
    for name, rule in cls.RULES.items():
        value = getattr(config, name)
        if isinstance(rule, Int) and value is not None:
            assert type(value) is int
        if isinstance(rule, Float) and value is not None:
            assert type(value) is float and math.isfinite(value)
        if isinstance(rule, Bool):
            assert type(value) is bool


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.SECTION)
@ANY_SETTINGS
@given(data=st.data())
def test_one_invalid_value_names_its_key(cls, data):
    values = data.draw(valid_section(cls))
    name = data.draw(st.sampled_from(sorted(cls.RULES)))
    values[name] = data.draw(invalid_values(cls.RULES[name]))
    with pytest.raises(ParamsError) as err:
        cls.from_dict(values)
    assert f"{cls.SECTION}.{name}" in str(err.value)  # a variant's bad override: sweep.variants.<name>.<key>


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.SECTION)
@ANY_SETTINGS
@given(data=st.data())
def test_any_junk_is_valid_or_a_params_error(cls, data):
    name = data.draw(st.sampled_from(sorted(cls.RULES)))
    value = data.draw(JUNK)
    try:
        cls.from_dict({name: value})
    except ParamsError as err:
        assert cls.SECTION in str(err)
    # anything else (TypeError, a comparison error, ...) fails the test


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.SECTION)
def test_unknown_keys_and_non_mapping_sections(cls):
    with pytest.raises(ParamsError, match=rf"unknown key\(s\) in {cls.SECTION} params: {cls.SECTION}\.zz_typo"):
        cls.from_dict({"zz_typo": 1})
    with pytest.raises(ParamsError, match=f"{cls.SECTION} must be a mapping"):
        cls.from_dict([1, 2])
    assert cls.from_dict(None) == cls()


def test_yaml_mangled_values_are_coerced_with_a_warning(tmp_path, caplog):
    (tmp_path / "params.yaml").write_text(
        "sae:\n  learning_rate: 3e-4\n  use_wandb: 'false'\n  k: '32'\n  wandb_tags: solo\n"
        "extract:\n  batch_size: '6'\n  skip_special_tokens: 'False'\n  max_tokens: 1.0e6\n")
    params = read_params(tmp_path / "params.yaml")
    assert params["sae"]["learning_rate"] == "3e-4"  # what YAML 1.1 gives
    with caplog.at_level(logging.WARNING):
        sae = SAEConfig.from_dict(section(params, "sae"))
        extract = SECTIONS["extract"].from_dict(section(params, "extract"))
    assert sae.learning_rate == 3e-4 and sae.use_wandb is False and sae.k == 32 and sae.wandb_tags == ("solo",)
    assert extract.batch_size == 6 and extract.skip_special_tokens is False and extract.max_tokens == 1_000_000
    text = caplog.text
    assert "sae.learning_rate: '3e-4' read as 0.0003" in text and "3.0e-4" in text
    assert "sae.use_wandb: 'false' read as False" in text and "extract.batch_size: '6' read as 6" in text


@pytest.mark.parametrize(("key", "value", "message"), [
    ("min_lr_ratio", -0.1, r"sae\.min_lr_ratio must be a finite number in \[0, 1\], got -0\.1"),
    ("aux_coef", -1.0, r"sae\.aux_coef must be a finite number >= 0"),
    ("checkpoint_every", -5, r"sae\.checkpoint_every must be an integer >= 0"),
    ("use_wandb", "maybe", r"sae\.use_wandb must be true or false, got 'maybe' \(a string\)"),
    ("learning_rate", "fast", r"sae\.learning_rate must be a finite number > 0"),
    ("batch_size", 0, r"sae\.batch_size must be an integer >= 1, got 0"),
    ("lr_decay", "exp", r"sae\.lr_decay must be one of cosine, linear, constant"),
])
def test_issue_15_nonsense_is_rejected(key, value, message):
    with pytest.raises(ParamsError, match=message):
        SAEConfig.from_dict({key: value})


def test_very_high_learning_rate_warns(caplog):
    with caplog.at_level(logging.WARNING):
        SAEConfig(learning_rate=5.0)
    assert "sae.learning_rate=5 is far above" in caplog.text


def test_params_file_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("sae: [unclosed\n")
    with pytest.raises(ParamsError, match="valid YAML"):
        read_params(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="a mapping of sections"):
        read_params(path)
    with pytest.raises(ParamsError, match="sae must be a mapping"):
        section({"sae": 5}, "sae")
    assert section({"sae": None}, "sae") == {} and section({}, "sae") == {}
    with pytest.raises(ParamsError, match="model must be a non-empty string"):
        model_spec({"model": None})
    assert model_spec({}) == "default"


STAGE_CASES = [  # stage module, a params file that is wrong in one key, the key named in the error
    ("prepare", {"prepare": {"eval_fraction": 1.5}}, "prepare.eval_fraction"),
    ("extract", {"sweep": {"sites": ["-1.mlp"]}}, "sweep.sites"),
    ("normalize", {"normalize": {"chunk_rows": "many"}}, "normalize.chunk_rows"),
    ("train", {"sae": {"min_lr_ratio": -1}}, "sae.min_lr_ratio"),
    ("evaluate", {"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
]


@pytest.mark.parametrize(("stage", "params", "key"), STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_stages_report_a_bad_key_without_a_traceback(stage, params, key, tmp_path):
    """Each stage, run as DVC runs it, stops on a bad key with one line naming it (exit 1, no traceback)."""
    import importlib

    main = importlib.import_module(f"stages.{stage}").main
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = {"prepare": ["--out", str(tmp_path / "out")],
            "extract": ["--texts", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "out")],
            "normalize": ["--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "out")],
            "train": ["--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "out")],
            "evaluate": ["--sae", str(tmp_path / "sae"), "--texts", str(tmp_path / "t.parquet"),
                         "--out", str(tmp_path / "out")]}[stage]
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), *args])
    assert result.exit_code == 1, (result.output, result.exception)
    assert key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
