"""The manifest reader: hostile bytes are refused fast, with a short message naming line and path."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.contracts.manifest import (
    MAX_DEPTH,
    MAX_VALUES,
    ManifestError,
    check_tree,
    load_documents,
    load_one,
)


def error_of(data: bytes | str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_documents(data)
    return info.value


def test_reads_plain_manifests_as_json_types() -> None:
    text = "a: 1\nb: [x, 'y', 2.5, null, true]\nc: {d: 2024-01-01}\n---\n---\nkind: Pod\n"
    assert load_documents(text) == [
        {"a": 1, "b": ["x", "y", 2.5, None, True], "c": {"d": "2024-01-01"}},
        None,
        {"kind": "Pod"},
    ]


def test_json_is_read_too() -> None:
    assert load_one(b'{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}


def test_json_exponents_are_numbers_as_in_json_and_kubectl() -> None:
    doc = load_one('{"eps": 1e-05, "a": 1.5e3, "b": -2E5, "c": "1e3", "d": 7}')
    assert doc == {"eps": 0.00001, "a": 1500.0, "b": -200000.0, "c": "1e3", "d": 7}
    assert "'1e999' is out of range" in str(error_of("a: 1e999"))


def test_unquoted_y_and_n_are_booleans_as_kubectl_reads_them() -> None:
    assert load_one("a: y\nb: N\nc: 'y'\nd: no\ny: 1") == {
        "a": True,
        "b": False,
        "c": "y",
        "d": False,
        "y": 1,
    }


def test_non_utf8_names_the_byte_and_offset() -> None:
    assert (
        str(error_of(b"a: ok\nb: \xc3\x28")) == "not UTF-8: byte 0xc3 at offset 9 (invalid continuation byte)"
    )
    assert "byte 0xff at offset 0" in str(error_of(b"\xff\xfe\x00a"))


def test_a_utf8_bom_is_accepted() -> None:
    assert load_one(b"\xef\xbb\xbfa: 1") == {"a": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\na: 2\n", "line 2: duplicate key 'a' (first on line 1)"),
        ("m:\n  x: 1\n  l: {k: 1, k: 2}\n", "line 3: m.l: duplicate key 'k' (first on line 3)"),
        ("s:\n- {a: 1}\n- {b: 1, b: 1}\n", "line 3: s[1]: duplicate key 'b' (first on line 3)"),
    ],
)
def test_duplicate_keys_are_refused_with_path_and_lines(text: str, expected: str) -> None:
    assert str(error_of(text)) == expected


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_fails_fast_in_little_memory() -> None:
    text = alias_bomb()  # 9**9 = 387 million strings if expanded
    assert len(text) < 1024
    tracemalloc.start()
    start = time.perf_counter()
    error = error_of(text)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert f"more than {MAX_VALUES:,} values" in str(error) and "aliases count expanded" in str(error)
    assert elapsed < 0.5 and peak < 20 * 2**20, (elapsed, peak)


def test_small_aliases_and_merges_are_read() -> None:
    text = "base: &b {x: 1, y: 2}\nlist: &l [1, 2]\nd:\n  <<: *b\n  y: 3\ne: *l\n"
    assert load_one(text) == {"base": {"x": 1, "y": 2}, "list": [1, 2], "d": {"x": 1, "y": 3}, "e": [1, 2]}


def test_a_recursive_alias_is_refused() -> None:
    assert "alias *a has no complete anchor" in str(error_of("a: &a [*a]"))


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_refused_not_a_recursion_error(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    error = error_of("x: " + opener * 200 + "1" + closer * 200)
    assert f"nested deeper than {MAX_DEPTH} levels" in str(error) or "maximum nesting depth" in str(error)
    assert len(str(error)) < 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: .nan", "a: '.nan' is not allowed: numbers must be finite"),
        ("a: -.inf", "a: '-.inf' is not allowed: numbers must be finite"),
        ("a: !!python/object:os.system x", "a: tag tag:yaml.org,2002:python/object:os.sy... is not allowed"),
        ("a: !!set {x}", "a: tag tag:yaml.org,2002:set is not allowed"),
        ("a: !!binary aGk=", "a: tag tag:yaml.org,2002:binary is not allowed"),
        ("on: 1", "keys must be strings, got true (YAML reads unquoted yes/no"),
        ("1: 1", "keys must be strings, got 1"),
        ("? [a]\n: 1", "keys must be strings, not mappings or lists"),
        ("a: 1" + "0" * 5000, "a: a number of 5,001 characters is out of range"),
        ("a: [unclosed", "not valid YAML: did not find expected ',' or ']'"),
        ("a: b\x00c", "not valid YAML: character #x0000 at position 4 (control characters are not allowed)"),
    ],
)
def test_refusals_say_why_in_a_short_line(text: str, expected: str) -> None:
    message = str(error_of(text))
    assert expected in message and len(message) < 200


def test_a_huge_key_or_value_is_never_echoed() -> None:
    key = "k" * (5 * 2**20)
    for text in (f"{key}: 1", f"? {key}\n: 1", f"a: {key}", f"a:\n  {key[:1000]}: 1\n  {key[:1000]}: 2"):
        start = time.perf_counter()
        message = str(error_of(text))
        assert time.perf_counter() - start < 2
        assert len(message) < 300, message[:300]


def test_size_limit_is_checked_before_parsing() -> None:
    assert "9.0 MiB; at most 8.0 MiB" in str(error_of(b" " * (9 * 2**20)))


def test_check_tree_refuses_deep_or_huge_bodies_without_recursion() -> None:
    deep: dict = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ManifestError, match=f"nested deeper than {MAX_DEPTH} levels"):
        check_tree(deep)
    with pytest.raises(ManifestError, match="more than"):
        check_tree({"x": list(range(MAX_VALUES + 1))})
    with pytest.raises(ManifestError, match="numbers must be finite"):
        check_tree({"x": [float("nan")]})
    check_tree({"a": [1, {"b": "c"}]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_reader(data: bytes) -> None:
    try:
        load_documents(data)
    except ManifestError as exc:
        assert len(str(exc)) < 400


YAML_ALPHABET = st.sampled_from([*"ab:-[]{},&*!|>'\"?#%@` \n\t.0123456789yn~<\\", "<<", "!!", "---", "..."])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(YAML_ALPHABET, max_size=120).map("".join))
def test_random_yaml_never_crashes_the_reader(text: str) -> None:
    try:
        docs = load_documents(text)
    except ManifestError as exc:
        assert len(str(exc)) < 400
        return
    for doc in docs:
        check_tree(doc)  # whatever is read is plain JSON data
