"""Names as Kubernetes checks them, and label values derived from names that always fit 63 characters."""

from __future__ import annotations

import hashlib
import re

import pytest

from esper.contracts.naming import label_key_problem, label_value, label_value_problem, name_problem

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize("name", ["a", "mlp-64", "a.b-c", "x" * 253, "0abc"])
def test_valid_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("Mlp", "(names are lowercase)"),
        ("my_bp", "must be lowercase letters, digits, '-' and '.'"),
        ("-a", "starting and ending with a letter or digit"),
        ("a" * 254, "at most 253 characters, got 254"),
    ],
)
def test_invalid_names_say_why(name: str, fragment: str) -> None:
    assert fragment in (name_problem(name) or "")


def test_short_names_are_their_own_label_value() -> None:
    assert label_value("residual-mlp-64") == "residual-mlp-64"
    assert label_value("a" * 63) == "a" * 63


@pytest.mark.parametrize("name", ["a" * 64, "a" * 253, "b." * 100 + "c", "x" * 60 + ".-" + "y" * 100])
def test_long_names_are_hash_shortened_to_a_valid_label_value(name: str) -> None:
    value = label_value(name)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert value.endswith(hashlib.sha256(name.encode()).hexdigest()[:10])
    assert label_value(name) == value  # deterministic: selectors can be computed from the name


def test_names_sharing_a_long_prefix_get_different_label_values() -> None:
    assert label_value("a" * 100 + "1") != label_value("a" * 100 + "2")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("app", None),
        ("app.kubernetes.io/name", None),
        ("a b", "the name must be letters, digits"),
        ("Bad_Prefix/x", "the prefix must be lowercase"),
        ("x/" + "n" * 64, "the name must have 1 to 63 characters"),
        ("x/", "the name must have 1 to 63 characters"),
    ],
)
def test_label_keys(key: str, problem: str | None) -> None:
    got = label_key_problem(key)
    assert got == problem if problem is None else problem in (got or "")


@pytest.mark.parametrize(("value", "ok"), [("", True), ("v1.2_x-y", True), ("-a", False), ("a" * 64, False)])
def test_label_values(value: str, ok: bool) -> None:
    assert (label_value_problem(value) is None) == ok
