"""Config validation names the bad key; overrides and merges behave."""
import pytest
from pydantic import Field

from d2v2.config import Config, ConfigError, apply_overrides, load_yaml, merge, validate


class Inner(Config):
    depth: int = Field(1, ge=1)
    ratio: float = Field(0.5, gt=0, lt=1)


class Outer(Config):
    name: str = "x"
    inner: Inner = Inner()


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"method\.inner\.dept: unknown key \(did you mean 'depth'\?\)"):
        validate(Outer, {"inner": {"dept": 3}}, where="method")


def test_impossible_value_is_named():
    with pytest.raises(ConfigError, match=r"inner\.ratio: .*less than 1"):
        validate(Outer, {"inner": {"ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"inner\.depth"):
        validate(Outer, {"inner": {"depth": "deep"}})


def test_overrides_and_merge():
    d = apply_overrides({"inner": {"depth": 1}}, ["inner.depth=4", "name=abc", "inner.ratio=0.25"])
    cfg = validate(Outer, d)
    assert cfg.inner.depth == 4 and cfg.name == "abc" and cfg.inner.ratio == 0.25
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["nonsense"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
